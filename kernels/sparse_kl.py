"""Sparse soft-target KL over given logits: forward with an online logsumexp, backward in place.

For row r of logits z [N, V], temperature tau and a sparse target q_r over the ids S_r
(CSR: row r owns entries row_ptr[r]:row_ptr[r+1] of token_ids / probs), with mass m = sum_S q:

    KL_r = sum_{k in S} q_k (log q_k - log_softmax(z/tau)_k)
         = sum_S q_k log q_k - (1/tau) sum_S q_k z_k + m * lse_r,      lse_r = logsumexp(z_r/tau)   (1)
    dKL_r/dz_r = (m * softmax(z_r/tau) - q_r) / tau          (q scattered to the vocabulary)   (2)

(docs/method.md, section 'The loss'.) Conventions: entries with q_k = 0 contribute nothing (0 log 0 = 0), rows
without entries have KL = 0 and zero gradient, m need not be 1 (then (1) is the generalized KL,
and (2) is still its exact gradient). A target id whose logit is -inf while q_k > 0 gives a
genuine KL = +inf; its gradient (2) stays finite. Logits of -inf off the support are fine.
Duplicate ids within a row are not supported here (calft.losses rejects them when validating).

Kernels (math in fp32 whatever the input dtype; numbered steps match the comments):
  1. `sparse_kl_lse_partial_kernel`, grid (N, splits): each program streams one vocabulary range
     of one row in BLOCK_V tiles, keeping a running max and per-lane running sums (Milakov &
     Gimelshein, arXiv 1805.02867), and writes one partial (max, sum). Splitting the row gives small N
     (a calibration batch is ~88 rows) enough programs to fill a GPU.
  2. `sparse_kl_forward_kernel`, grid (N,): combines the partials into lse_r, gathers the K
     target logits (the "K-way gather-dot" of (1)) and writes KL_r, lse_r (as M_r and log S_r), m_r, and z_k
     per entry.
     KL is assembled as sum q (log q - (z/tau - M)) + m log S with M the row max and
     S = sum exp(z/tau - M): no large M is added and subtracted, so |z| ~ 1e4 stays accurate.
  3. `sparse_kl_backward_kernel`, grid (N, splits): grad = m * exp(z/tau - lse) * c with
     c = dLoss/dKL_r / tau, written to a new tensor or over the logits (memory-lean training).
  4. `sparse_kl_target_grad_kernel`, grid (N,): overwrites the K target positions with the exact
     (m * exp(z_k/tau - lse) - q_k) * c, from the fp32 target logits saved by step 2 (so the
     in-place variant still has them, and bf16 gradients are rounded once, after the
     subtraction: the cancellation Liger-Kernel's cross_entropy warns about). The kernel boundary
     orders it after step 3. `calft.kernels.linear_sparse_kl` reuses it.
Traffic: forward reads the logits once; backward reads them once and writes the gradient once.
"""
import torch
import triton
import triton.language as tl

from .utils import KERNEL_DTYPES, check_triton_device, is_interpreter, num_programs_target
from .utils import load_target_block, online_lse_update, row_lse_from_partials, split_vocab, store_row_kl

# Vocabulary tile per loop step. 4096 fp32 lanes over 8 warps is 16 values per thread for the
# running (max, sum): enough bytes in flight per SM to saturate HBM, no register spills.
MAX_BLOCK_V = 4096
# The interpreter runs one tile per numpy call: big tiles mean few Python-level iterations.
MAX_BLOCK_V_INTERPRET = 8192
# Target entries gathered per step: K is ~10 for digit tries and rarely above a few thousand.
BLOCK_K = 64


@triton.jit
def sparse_kl_entry_terms(q, z, inv_tau, m_ref):
    """Per-entry part of (1): q (log q - (z/tau - M)); 0 where q = 0 (0 log 0 = 0)."""
    pos = q > 0
    log_q = tl.log(tl.where(pos, q, 1.0))
    shifted = tl.where(pos, z * inv_tau - m_ref, 0.0)  # no 0 * inf where q = 0 and z = -inf
    return tl.where(pos, q * (log_q - shifted), 0.0)


@triton.jit
def sparse_kl_lse_partial_kernel(
    logits_ptr, logits_row_stride, part_max_ptr, part_sum_ptr,
    V, inv_tau, split_v, num_splits,
    BLOCK_V: tl.constexpr,
):
    """Step 1: partial (max, sum exp) of z/tau over vocabulary range `split` of row `row`."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_base = logits_ptr + row.to(tl.int64) * logits_row_stride
    v_start = split * split_v
    v_end = tl.minimum(v_start + split_v, V)
    offs = tl.arange(0, BLOCK_V)
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)  # an fp32 scalar -inf
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + offs
        x = tl.load(row_base + cols, mask=cols < v_end, other=float("-inf")).to(tl.float32)
        m, s = online_lse_update(m, s, x * inv_tau)
    tl.store(part_max_ptr + row * num_splits + split, m)
    tl.store(part_sum_ptr + row * num_splits + split, tl.sum(s, axis=0))


@triton.jit
def sparse_kl_forward_kernel(
    logits_ptr, logits_row_stride, row_ptr_ptr, ids_ptr, probs_ptr,
    part_max_ptr, part_sum_ptr, loss_ptr, lse_ptr, mass_ptr, zt_ptr,
    V, inv_tau, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Step 2: lse_r from the partials, then the K-way gather-dot of (1), BLOCK_K entries a step."""
    row = tl.program_id(0)
    m_ref, s_row = row_lse_from_partials(part_max_ptr, part_sum_ptr, row, num_splits, BLOCK_S)
    row_base = logits_ptr + row.to(tl.int64) * logits_row_stride
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)
    acc = tl.zeros([BLOCK_K], tl.float32)
    mass = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(start, end, BLOCK_K):
        k, k_ok, ids, q, ok = load_target_block(ids_ptr, probs_ptr, k0, end, V, BLOCK_K)
        z = tl.load(row_base + ids, mask=ok, other=0.0).to(tl.float32)
        tl.store(zt_ptr + k, z, mask=k_ok)
        acc += sparse_kl_entry_terms(q, z, inv_tau, m_ref)
        mass += q
    store_row_kl(loss_ptr, lse_ptr, mass_ptr, row, acc, mass, m_ref, s_row)


@triton.jit
def sparse_kl_backward_kernel(
    logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, lse_ptr, mass_ptr, scale_ptr,
    V, inv_tau, split_v,
    BLOCK_V: tl.constexpr,
):
    """Step 3: grad = m * softmax(z/tau) * c over one vocabulary range (may alias the logits)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    m_ref = tl.load(lse_ptr + 2 * row)
    log_s = tl.load(lse_ptr + 2 * row + 1)
    log_s = tl.where(log_s != float("-inf"), log_s, 0.0)  # all -inf row: p = exp(-inf) = 0
    coef = tl.load(mass_ptr + row) * tl.load(scale_ptr + row)
    z_base = logits_ptr + row.to(tl.int64) * logits_row_stride
    g_base = grad_ptr + row.to(tl.int64) * grad_row_stride
    v_start = split * split_v
    v_end = tl.minimum(v_start + split_v, V)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + offs
        col_ok = cols < v_end
        x = tl.load(z_base + cols, mask=col_ok, other=float("-inf")).to(tl.float32)
        g = coef * tl.exp((x * inv_tau - m_ref) - log_s)
        tl.store(g_base + cols, g.to(grad_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def sparse_kl_target_grad_kernel(
    grad_ptr, grad_row_stride, row_ptr_ptr, ids_ptr, probs_ptr, zt_ptr,
    lse_ptr, mass_ptr, scale_ptr,
    v_lo, v_hi, inv_tau,
    BLOCK_K: tl.constexpr,
):
    """Step 4: grad[r, id - v_lo] = (m * exp(z_k/tau - lse) - q_k) * c for ids in [v_lo, v_hi)."""
    row = tl.program_id(0)
    m_ref = tl.load(lse_ptr + 2 * row)
    log_s = tl.load(lse_ptr + 2 * row + 1)
    log_s = tl.where(log_s != float("-inf"), log_s, 0.0)
    m_row = tl.load(mass_ptr + row)
    c = tl.load(scale_ptr + row)
    g_base = grad_ptr + row.to(tl.int64) * grad_row_stride
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(start, end, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < end
        ids = tl.load(ids_ptr + k, mask=k_ok, other=0)
        ok = k_ok & (ids >= v_lo) & (ids < v_hi)
        q = tl.load(probs_ptr + k, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(zt_ptr + k, mask=ok, other=0.0)
        g = (m_row * tl.exp((z * inv_tau - m_ref) - log_s) - q) * c
        tl.store(g_base + (ids - v_lo), g.to(grad_ptr.dtype.element_ty), mask=ok)


def _block_v(V: int, block_v: int | None) -> int:
    if block_v is not None:
        return block_v
    cap = MAX_BLOCK_V_INTERPRET if is_interpreter() else MAX_BLOCK_V
    return min(cap, max(16, triton.next_power_of_2(V)))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _check_inputs(logits: torch.Tensor, row_ptr: torch.Tensor, token_ids: torch.Tensor,
                  probs: torch.Tensor) -> None:
    check_triton_device(logits, row_ptr, token_ids, probs)
    if logits.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernels read {KERNEL_DTYPES} logits, got {logits.dtype}")


def sparse_kl_forward(logits: torch.Tensor, row_ptr: torch.Tensor, token_ids: torch.Tensor,
                      probs: torch.Tensor, tau: float = 1.0, *, block_v: int | None = None,
                      num_splits: int | None = None):
    """Per-row KL (1) of logits [N, V]. Returns (kl [N], lse [N, 2], mass [N], z_target [nnz]),
    all fp32, with lse_r = lse[r, 0] + lse[r, 1] = M_r + log S_r; the last three are what
    `sparse_kl_backward` needs. No host synchronization.

    block_v / num_splits override the launch heuristic (tests use them to force several tiles
    and several vocabulary splits on small shapes)."""
    _check_inputs(logits, row_ptr, token_ids, probs)
    row_ptr, token_ids, probs = (t.contiguous() for t in (row_ptr, token_ids, probs))
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    dev = logits.device
    f32 = dict(device=dev, dtype=torch.float32)
    kl, mass = torch.zeros(N, **f32), torch.zeros(N, **f32)
    lse = torch.zeros(N, 2, **f32)
    z_target = torch.zeros(token_ids.numel(), **f32)
    if N == 0:
        return kl, lse, mass, z_target
    bv = _block_v(V, block_v)
    split_v, splits = split_vocab(V, bv, N, num_programs_target(dev), num_splits)
    part_max = torch.empty(N, splits, **f32)
    part_sum = torch.empty(N, splits, **f32)
    inv_tau = 1.0 / tau
    sparse_kl_lse_partial_kernel[(N, splits)](
        logits, logits.stride(0), part_max, part_sum, V, inv_tau, split_v, splits,
        BLOCK_V=bv, num_warps=_num_warps(bv))
    sparse_kl_forward_kernel[(N,)](
        logits, logits.stride(0), row_ptr, token_ids, probs, part_max, part_sum,
        kl, lse, mass, z_target, V, inv_tau, splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_K=BLOCK_K, num_warps=4)
    return kl, lse, mass, z_target


def sparse_kl_backward(logits: torch.Tensor, row_ptr: torch.Tensor, token_ids: torch.Tensor,
                       probs: torch.Tensor, lse: torch.Tensor, mass: torch.Tensor,
                       z_target: torch.Tensor, grad_kl: torch.Tensor, tau: float = 1.0, *,
                       inplace: bool = False, block_v: int | None = None,
                       num_splits: int | None = None) -> torch.Tensor:
    """Gradient (2) of sum_r grad_kl[r] * KL_r w.r.t. the logits, in the logits' dtype.

    inplace=True writes it over `logits` (which must be contiguous) and returns that tensor."""
    _check_inputs(logits, row_ptr, token_ids, probs)
    row_ptr, token_ids, probs = (t.contiguous() for t in (row_ptr, token_ids, probs))
    N, V = logits.shape
    if inplace:
        if logits.stride(-1) != 1:
            raise ValueError("inplace gradient needs logits with a unit last stride")
        grad = logits
    else:
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if N == 0:
        return grad
    scale = (grad_kl.to(torch.float32) / tau).contiguous()
    bv = _block_v(V, block_v)
    split_v, splits = split_vocab(V, bv, N, num_programs_target(logits.device), num_splits)
    inv_tau = 1.0 / tau
    sparse_kl_backward_kernel[(N, splits)](
        logits, logits.stride(0), grad, grad.stride(0), lse, mass, scale, V, inv_tau, split_v,
        BLOCK_V=bv, num_warps=_num_warps(bv))
    sparse_kl_target_grad_kernel[(N,)](
        grad, grad.stride(0), row_ptr, token_ids, probs, z_target, lse, mass, scale,
        0, V, inv_tau, BLOCK_K=BLOCK_K, num_warps=4)
    return grad


class SoftTargetKLFunction(torch.autograd.Function):
    """Autograd wrapper: per-row KL (1) of logits [N, V], fp32 [N]; backward (2).

    apply(logits, row_ptr, token_ids, probs, tau, inplace, block_v, num_splits). With
    inplace=True the backward overwrites the logits with their gradient: only for logits that
    nothing else reads afterwards (e.g. the output of an LM head that is not reused)."""

    @staticmethod
    def forward(ctx, logits, row_ptr, token_ids, probs, tau=1.0, inplace=False, block_v=None,
                num_splits=None):
        kl, lse, mass, z_target = sparse_kl_forward(
            logits, row_ptr, token_ids, probs, tau, block_v=block_v, num_splits=num_splits)
        ctx.save_for_backward(logits, row_ptr, token_ids, probs, lse, mass, z_target)
        ctx.config = (tau, inplace, block_v, num_splits)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        logits, row_ptr, token_ids, probs, lse, mass, z_target = ctx.saved_tensors
        tau, inplace, block_v, num_splits = ctx.config
        grad = sparse_kl_backward(
            logits, row_ptr, token_ids, probs, lse, mass, z_target, grad_kl.contiguous(), tau,
            inplace=inplace, block_v=block_v, num_splits=num_splits)
        return grad, None, None, None, None, None, None, None
