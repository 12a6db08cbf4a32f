"""Fused LM head + sparse soft-target KL: the [N, V] logits are never held in memory.

With hidden states h [N, H], LM head W [V, H] and optional bias b [V], the logits are
z = h W^T + b and the loss per row is the KL of `calft.kernels.sparse_kl` (docs/method.md, section 'The loss'):

    KL_r = sum_S q_k log q_k - (1/tau) sum_S q_k z_k + m_r * lse_r                          (1)
    G    = dKL/dz = (m * softmax(z/tau) - Q) / tau * c        (Q: the CSR targets, dense [N,V]) (2)
    dh = G W,   dW = G^T h,   db = sum_r G_r                                                (3)

where c_r = dLoss/dKL_r. Cost: (1) is one matmul of 2NVH flops; (2)-(3) are a recomputation
(2NVH) and two gradient matmuls (2NVH each). That, not memory, is the physical limit.

Forward, in the style of Apple's Cut Cross-Entropy (Wijmans et al., arXiv 2411.09009):
  1. `linear_sparse_kl_lse_partial_kernel`, grid (row blocks, vocabulary splits): a tiled
     matmul that streams BLOCK_V vocabulary tiles, each reduced over H in BLOCK_H steps, and
     folds every [BLOCK_N, BLOCK_V] tile into a per-row online logsumexp; writes per-row partial
     (max, sum) for its vocabulary range. Logits live only in registers.
  2. `linear_sparse_kl_forward_kernel`, grid (N,): combines the partials into lse_r and computes
     the K target logits z_k = h_r . W[t_k] + b[t_k] (the K-way gather-dot), then (1) exactly as
     the standalone kernel does (shared `sparse_kl_entry_terms`).
Backward, chunked over the vocabulary (ranges of chunk_v columns, all N rows at once):
  3. `linear_sparse_kl_dlogits_kernel`, grid (row blocks, vocabulary tiles of the chunk):
     recomputes the logits tile and writes m * softmax(z/tau) * c into an [N, chunk_v] scratch.
  4. `sparse_kl_target_grad_kernel` (imported from sparse_kl) overwrites the target positions
     with the exact (m * p_k - q_k) * c, from the fp32 target logits of step 2.
  5. cuBLAS (torch.mm) matmuls: dW[chunk] = G_chunk^T h written directly (fp32 accumulation
     inside the matmul, and each chunk of dW is owned by one matmul: no read-modify-write of
     dW, unlike the per-row-chunk scheme of Liger-Kernel's fused linear cross-entropy);
     dh += G_chunk W[chunk] (accumulated in an fp32 [N, H] buffer when there are several
     chunks); db[chunk] = column sums.
Why not a fully fused backward (dh and dW from registers with atomics, as CCE does): with
H = 2048 a [BLOCK_N, H] accumulator does not fit in registers, so every tile would atomically
add [BLOCK_N, H] and [BLOCK_V, H] fp32 blocks: ~160 GB of atomic traffic at N=8192,
V=151936, more than the matmuls themselves; CCE avoids it only by skipping tiles whose
gradient is below a threshold, which changes the numbers. The scratch costs N x chunk_v
elements (256 MiB by default), never N x V, and the gradient matmuls run at cuBLAS speed.
No host synchronization anywhere (chunking depends on shapes only). Two CCE tricks are left
out on purpose: dropping rows without targets before the matmul needs their count on the host
(calft already feeds only answer positions to the LM head), and skipping tiles whose gradient
is below a threshold changes the numbers.
"""
import torch
import triton
import triton.language as tl

from .sparse_kl import BLOCK_K, sparse_kl_entry_terms, sparse_kl_target_grad_kernel
from .utils import KERNEL_DTYPES, check_triton_device, dot_precision, is_interpreter, load_target_block
from .utils import num_programs_target, row_lse_from_partials, split_vocab, store_row_kl

# Matmul tile on a GPU: [128 x 64] x [64 x 128] bf16 operands, 3 pipeline stages = 96 KiB of
# shared memory (H100/H200 have 228 KiB per SM); a 128x128 fp32 accumulator is 64 registers
# per thread at 8 warps, which leaves room for the online-logsumexp state without spills.
GPU_BLOCK_N, GPU_BLOCK_V, GPU_BLOCK_H, GPU_NUM_WARPS, GPU_NUM_STAGES = 128, 128, 64, 8, 3
# fp32 operands take tl.dot's FMA path (IEEE precision, no tensor cores), which holds both operand
# tiles in registers: the 16-bit tiles above spilled 0.5-9 KB per thread in fp32 on sm_80 and
# sm_90 (benchmarks/kernels_compile.py); [64 x 16] x [16 x 64] at 4 warps, 1 stage, spill nothing
# (128-162 registers; at 8 warps sm_90 still spilled 8 bytes).
GPU_FP32_BLOCK_N, GPU_FP32_BLOCK_V, GPU_FP32_BLOCK_H, GPU_FP32_NUM_WARPS, GPU_FP32_NUM_STAGES = 64, 64, 16, 4, 1
# Backward scratch (one vocabulary chunk of G for all rows). 256 MiB keeps chunks >= 16K columns
# (big, efficient matmuls) at N = 8192 in bf16 while staying far below N x V.
MAX_SCRATCH_BYTES = 256 * 2**20
# Rows of the K-way gather are read BLOCK_H wide; 32 entries x 64 columns per step.
GATHER_BLOCK_K = 32


@triton.jit
def _logits_tile(h_ptr, h_row_stride, w_ptr, w_row_stride, b_ptr, rows, row_ok, cols, col_ok, H,
                 inv_tau, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """z/tau for a [BLOCK_N, BLOCK_V] tile, fp32; -inf in columns past the range."""
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    h_rows = h_ptr + rows[:, None].to(tl.int64) * h_row_stride
    w_cols = w_ptr + cols[None, :].to(tl.int64) * w_row_stride
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + offs_h
        h_ok = hh < H
        a = tl.load(h_rows + hh[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        b = tl.load(w_cols + hh[:, None], mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter has no bf16 arithmetic
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_tau, float("-inf"))


@triton.jit
def linear_sparse_kl_lse_partial_kernel(
    h_ptr, h_row_stride, w_ptr, w_row_stride, b_ptr, part_max_ptr, part_sum_ptr,
    N, V, H, inv_tau, split_v, num_splits,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Step 1: per-row partial (max, sum exp) of z/tau over one vocabulary range."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_v = tl.arange(0, BLOCK_V)
    v_start = split * split_v
    v_end = tl.minimum(v_start + split_v, V)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + offs_v
        z = _logits_tile(h_ptr, h_row_stride, w_ptr, w_row_stride, b_ptr, rows, row_ok, cols,
                         cols < v_end, H, inv_tau, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST,
                         DOT_PRECISION)
        # Online logsumexp per row; -inf guards as in utils.online_lse_update.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        finite = m_new != float("-inf")
        m_ref = tl.where(finite, m_new, 0.0)
        alpha = tl.where(finite, tl.exp(m - m_ref), 1.0)
        s = s * alpha + tl.sum(tl.exp(z - m_ref[:, None]), axis=1)
        m = m_new
    tl.store(part_max_ptr + rows * num_splits + split, m, mask=row_ok)
    tl.store(part_sum_ptr + rows * num_splits + split, s, mask=row_ok)


@triton.jit
def linear_sparse_kl_forward_kernel(
    h_ptr, h_row_stride, w_ptr, w_row_stride, b_ptr, row_ptr_ptr, ids_ptr, probs_ptr,
    part_max_ptr, part_sum_ptr, loss_ptr, lse_ptr, mass_ptr, zt_ptr,
    V, H, inv_tau, num_splits,
    HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Step 2: lse_r from the partials; z_k = h_r . W[t_k] + b[t_k]; KL (1), BLOCK_K entries a step."""
    row = tl.program_id(0)
    m_ref, s_row = row_lse_from_partials(part_max_ptr, part_sum_ptr, row, num_splits, BLOCK_S)
    h_row = h_ptr + row.to(tl.int64) * h_row_stride
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_K], tl.float32)
    mass = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(start, end, BLOCK_K):
        k, k_ok, ids, q, ok = load_target_block(ids_ptr, probs_ptr, k0, end, V, BLOCK_K)
        w_rows = w_ptr + ids[:, None].to(tl.int64) * w_row_stride
        z = tl.zeros([BLOCK_K], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + offs_h
            h_ok = hh < H
            hv = tl.load(h_row + hh, mask=h_ok, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + hh[None, :], mask=ok[:, None] & h_ok[None, :], other=0.0)
            z += tl.sum(wv.to(tl.float32) * hv[None, :], axis=1)
        if HAS_BIAS:
            z += tl.load(b_ptr + ids, mask=ok, other=0.0).to(tl.float32)
        tl.store(zt_ptr + k, z, mask=k_ok)
        acc += sparse_kl_entry_terms(q, z, inv_tau, m_ref)
        mass += q
    store_row_kl(loss_ptr, lse_ptr, mass_ptr, row, acc, mass, m_ref, s_row)


@triton.jit
def linear_sparse_kl_dlogits_kernel(
    h_ptr, h_row_stride, w_ptr, w_row_stride, b_ptr, lse_ptr, mass_ptr, scale_ptr,
    g_ptr, g_row_stride, N, v_lo, v_hi, H, inv_tau,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Step 3: G[:, v - v_lo] = m * exp(z/tau - lse) * c on one tile of the chunk [v_lo, v_hi)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_hi
    z = _logits_tile(h_ptr, h_row_stride, w_ptr, w_row_stride, b_ptr, rows, row_ok, cols, col_ok,
                     H, inv_tau, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
    m_ref = tl.load(lse_ptr + 2 * rows, mask=row_ok, other=0.0)
    log_s = tl.load(lse_ptr + 2 * rows + 1, mask=row_ok, other=0.0)
    log_s = tl.where(log_s != float("-inf"), log_s, 0.0)
    coef = tl.load(mass_ptr + rows, mask=row_ok, other=0.0) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    g = coef[:, None] * tl.exp((z - m_ref[:, None]) - log_s[:, None])
    g_ptrs = g_ptr + rows[:, None].to(tl.int64) * g_row_stride + (cols - v_lo)[None, :]
    tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _blocks(N: int, V: int, H: int, block_n=None, block_v=None, block_h=None, dtype=torch.bfloat16):
    """One config from the shape and dtype: big tiles on a GPU (smaller for fp32, see
    GPU_FP32_*); in the interpreter tiles just large enough (tl.dot needs every dimension >= 16)."""
    if is_interpreter():
        bn = max(16, min(64, triton.next_power_of_2(N)))
        bv = max(16, min(256, triton.next_power_of_2(V)))
        bh = max(16, min(64, triton.next_power_of_2(H)))
    else:
        fp32 = dtype == torch.float32
        max_n = GPU_FP32_BLOCK_N if fp32 else GPU_BLOCK_N
        bn = max_n if N >= max_n else max(16, triton.next_power_of_2(N))
        bv, bh = (GPU_FP32_BLOCK_V, GPU_FP32_BLOCK_H) if fp32 else (GPU_BLOCK_V, GPU_BLOCK_H)
    return block_n or bn, block_v or bv, block_h or bh


def _check_inputs(hidden, weight, bias, row_ptr, token_ids, probs):
    check_triton_device(hidden, weight, bias, row_ptr, token_ids, probs)
    if hidden.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernels read {KERNEL_DTYPES} inputs, got {hidden.dtype}")


def _launch_opts(interp: bool, dtype=torch.bfloat16) -> dict:
    if interp:
        return {}
    if dtype == torch.float32:
        return dict(num_warps=GPU_FP32_NUM_WARPS, num_stages=GPU_FP32_NUM_STAGES)
    return dict(num_warps=GPU_NUM_WARPS, num_stages=GPU_NUM_STAGES)


def linear_sparse_kl_forward(hidden, weight, bias, row_ptr, token_ids, probs, tau=1.0, *,
                             block_n=None, block_v=None, block_h=None, num_splits=None):
    """Per-row KL (1) of z = hidden @ weight^T (+ bias) without materializing z.

    Returns (kl [N], lse [N, 2] = (M, log S), mass [N], z_target [nnz]), fp32; no host sync."""
    _check_inputs(hidden, weight, bias, row_ptr, token_ids, probs)
    row_ptr, token_ids, probs = (t.contiguous() for t in (row_ptr, token_ids, probs))
    hidden, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (hidden, weight))
    bias = bias.contiguous() if bias is not None else None
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    kl, mass = torch.zeros(N, **f32), torch.zeros(N, **f32)
    lse = torch.zeros(N, 2, **f32)
    z_target = torch.zeros(token_ids.numel(), **f32)
    if N == 0:
        return kl, lse, mass, z_target
    bn, bv, bh = _blocks(N, V, H, block_n, block_v, block_h, hidden.dtype)
    row_blocks = triton.cdiv(N, bn)
    # 8 programs per SM: the tail of the last wave stays a small fraction of the launch.
    split_v, splits = split_vocab(V, bv, row_blocks, 2 * num_programs_target(hidden.device),
                                  num_splits)
    part_max = torch.empty(N, splits, **f32)
    part_sum = torch.empty(N, splits, **f32)
    has_bias = bias is not None
    b = bias if has_bias else hidden  # placeholder pointer, never read when HAS_BIAS is False
    interp = is_interpreter()
    inv_tau = 1.0 / tau
    linear_sparse_kl_lse_partial_kernel[(row_blocks, splits)](
        hidden, hidden.stride(0), weight, weight.stride(0), b, part_max, part_sum,
        N, V, H, inv_tau, split_v, splits,
        HAS_BIAS=has_bias, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
        UPCAST=interp and hidden.dtype != torch.float32,
        DOT_PRECISION=dot_precision(hidden.dtype), **_launch_opts(interp, hidden.dtype))
    linear_sparse_kl_forward_kernel[(N,)](
        hidden, hidden.stride(0), weight, weight.stride(0), b, row_ptr, token_ids, probs,
        part_max, part_sum, kl, lse, mass, z_target, V, H, inv_tau, splits,
        HAS_BIAS=has_bias, BLOCK_S=max(2, triton.next_power_of_2(splits)),
        BLOCK_K=GATHER_BLOCK_K, BLOCK_H=min(64, max(16, triton.next_power_of_2(H))))
    return kl, lse, mass, z_target


def linear_sparse_kl_backward(hidden, weight, bias, row_ptr, token_ids, probs, lse, mass,
                              z_target, grad_kl, tau=1.0, *, needs=(True, True, True),
                              chunk_v=None, block_n=None, block_v=None, block_h=None,
                              max_scratch_bytes=MAX_SCRATCH_BYTES):
    """Gradients (3) of sum_r grad_kl[r] * KL_r: (d_hidden, d_weight, d_bias), each None when
    `needs` says so; returned in the dtypes of hidden / weight / bias."""
    _check_inputs(hidden, weight, bias, row_ptr, token_ids, probs)
    row_ptr, token_ids, probs = (t.contiguous() for t in (row_ptr, token_ids, probs))
    bias = bias.contiguous() if bias is not None else None
    hidden, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (hidden, weight))
    N, H = hidden.shape
    V = weight.shape[0]
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    d_w = torch.empty_like(weight) if need_w else None
    d_b = torch.empty(V, device=weight.device, dtype=torch.float32) if need_b else None
    if N == 0:
        d_w = d_w.zero_() if need_w else None
        d_b = d_b.to(bias.dtype).zero_() if need_b else None
        return (torch.zeros_like(hidden) if need_h else None), d_w, d_b
    bn, bv, bh = _blocks(N, V, H, block_n, block_v, block_h, hidden.dtype)
    if chunk_v is None:
        per_col = N * hidden.element_size()
        chunk_v = max(bv, max_scratch_bytes // per_col // bv * bv)
    chunk_v = min(chunk_v, triton.cdiv(V, bv) * bv)
    num_chunks = triton.cdiv(V, chunk_v)
    scale = (grad_kl.to(torch.float32) / tau).contiguous()
    scratch = torch.empty(N, chunk_v, device=hidden.device, dtype=hidden.dtype)
    # dh is summed over chunks: in fp32 unless a single matmul produces it.
    d_h = None
    if need_h and num_chunks > 1:
        d_h = torch.zeros(N, H, device=hidden.device, dtype=torch.float32)
    has_bias = bias is not None
    b = bias if has_bias else hidden
    interp = is_interpreter()
    inv_tau = 1.0 / tau
    for v_lo in range(0, V, chunk_v):
        v_hi = min(v_lo + chunk_v, V)
        g = scratch[:, : v_hi - v_lo]
        linear_sparse_kl_dlogits_kernel[(triton.cdiv(N, bn), triton.cdiv(v_hi - v_lo, bv))](
            hidden, hidden.stride(0), weight, weight.stride(0), b, lse, mass, scale,
            g, g.stride(0), N, v_lo, v_hi, H, inv_tau,
            HAS_BIAS=has_bias, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
            UPCAST=interp and hidden.dtype != torch.float32,
            DOT_PRECISION=dot_precision(hidden.dtype), **_launch_opts(interp, hidden.dtype))
        sparse_kl_target_grad_kernel[(N,)](
            g, g.stride(0), row_ptr, token_ids, probs, z_target, lse, mass, scale,
            v_lo, v_hi, inv_tau, BLOCK_K=BLOCK_K)
        w_chunk = weight[v_lo:v_hi]
        if need_h:
            if num_chunks == 1:
                d_h = g @ w_chunk
            elif d_h.dtype == g.dtype:
                d_h.addmm_(g, w_chunk)
            else:
                d_h += g @ w_chunk
        if need_w:
            torch.mm(g.t(), hidden, out=d_w[v_lo:v_hi])
        if need_b:
            torch.sum(g, dim=0, dtype=torch.float32, out=d_b[v_lo:v_hi])
    if need_h:
        d_h = d_h.to(hidden.dtype)
    if need_b:
        d_b = d_b.to(bias.dtype)
    return d_h, d_w, d_b


class LinearSoftTargetKLFunction(torch.autograd.Function):
    """Autograd wrapper: per-row KL (1) of hidden @ weight^T (+ bias), fp32 [N]; backward (3).

    apply(hidden, weight, bias, row_ptr, token_ids, probs, tau, chunk_v)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_ptr, token_ids, probs, tau=1.0, chunk_v=None):
        kl, lse, mass, z_target = linear_sparse_kl_forward(
            hidden, weight, bias, row_ptr, token_ids, probs, tau)
        ctx.save_for_backward(hidden, weight, bias, row_ptr, token_ids, probs, lse, mass, z_target)
        ctx.config = (tau, chunk_v)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, bias, row_ptr, token_ids, probs, lse, mass, z_target = ctx.saved_tensors
        tau, chunk_v = ctx.config
        d_h, d_w, d_b = linear_sparse_kl_backward(
            hidden, weight, bias, row_ptr, token_ids, probs, lse, mass, z_target,
            grad_kl.contiguous(), tau, needs=ctx.needs_input_grad[:3], chunk_v=chunk_v)
        return d_h, d_w, d_b, None, None, None, None, None
