"""Soft-target KL losses (docs/method.md, section 'The loss'): sparse targets, validation, backend dispatch.

For row r with logits z_r [V], temperature tau and a sparse target q over ids S_r, m_r = sum q:

    KL_r = sum_{k in S} q_k (log q_k - log_softmax(z_r/tau)_k)
         = sum_S q log q - (1/tau) sum_S q_k z_k + m_r logsumexp(z_r/tau)
    dKL_r/dz_r = (m_r softmax(z_r/tau) - q) / tau

loss = reduce_r(weights[r] * KL_r) with reduction "mean" (sum / N), "sum" or "none" ([N]).
Rows without entries give 0 with zero gradient; entries with q = 0 contribute nothing
(0 log 0 = 0); a target whose logit is -inf while q > 0 gives loss +inf (a genuine infinite
KL) with a finite gradient. Duplicate token ids within a row are rejected by validation.

Backends (one place chooses, `_pick_backend`): "triton" = the kernels in calft.kernels (CUDA
tensors, or CPU tensors under TRITON_INTERPRET=1); "torch" = the vectorized autograd Functions
below (CPU fallback, also float64); "auto" = triton for CUDA tensors, torch otherwise. Both
compute in fp32 whatever the input dtype (float64 inputs stay float64 on the torch path).
`soft_target_kl_ref` / `linear_soft_target_kl_ref` are the obvious per-row references
(the test oracle). Nothing here calls .item() when validate=False: the trainer's hot path has
no host sync and works under torch.compile.

What validate=False trusts (the trainer's targets come from checked, digest-verified data):
  - every token id is in [0, V). Out-of-range ids are not masked: a negative id indexes from the
    end of the row on the torch path (PyTorch indexing) and reads nothing on the Triton path
    (masked gathers), so the loss is silently wrong. Keep validate=True for untrusted targets.
  - the logits hold no +inf or NaN: the row maximum is +inf then and the loss and its gradient
    are NaN (the trainer stops on a non-finite loss, exit status 3). -inf logits are fine.
Shape errors (V = 0, mismatched N, devices) raise ValueError whatever `validate` says.
"""
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class SparseTargets:
    """CSR targets for N rows: row r owns entries row_ptr[r]:row_ptr[r+1].

    row_ptr int64 [N+1], token_ids int64 [nnz], probs floating [nnz] (float32 normally;
    float64 is kept for float64 checks). Structural checks happen here (no host sync)."""

    row_ptr: torch.Tensor
    token_ids: torch.Tensor
    probs: torch.Tensor

    def __post_init__(self):
        for name in ("row_ptr", "token_ids", "probs"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise ValueError(f"SparseTargets.{name} must be a 1-D tensor")
        for name in ("row_ptr", "token_ids"):
            if getattr(self, name).dtype != torch.int64:
                raise ValueError(f"SparseTargets.{name} must be int64, got {getattr(self, name).dtype}")
        if not self.probs.is_floating_point():
            raise ValueError(f"SparseTargets.probs must be floating point, got {self.probs.dtype}")
        if self.row_ptr.numel() < 1:
            raise ValueError("SparseTargets.row_ptr needs N+1 >= 1 entries")
        if self.token_ids.numel() != self.probs.numel():
            raise ValueError(f"SparseTargets has {self.token_ids.numel()} token ids but "
                             f"{self.probs.numel()} probabilities")
        devices = {self.row_ptr.device, self.token_ids.device, self.probs.device}
        if len(devices) > 1:
            raise ValueError(f"SparseTargets tensors are on different devices: {sorted(map(str, devices))}")

    @property
    def num_rows(self) -> int:
        return self.row_ptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.token_ids.numel()

    def to(self, device) -> "SparseTargets":
        return SparseTargets(*(t.to(device, non_blocking=True)
                               for t in (self.row_ptr, self.token_ids, self.probs)))

    @classmethod
    def from_lists(cls, ids_per_row, probs_per_row, device=None) -> "SparseTargets":
        """Build from per-row Python/numpy sequences (data preparation, not the hot path)."""
        if len(ids_per_row) != len(probs_per_row):
            raise ValueError(f"{len(ids_per_row)} id rows but {len(probs_per_row)} prob rows")
        counts = [len(ids) for ids in ids_per_row]
        for r, (ids, ps) in enumerate(zip(ids_per_row, probs_per_row)):
            if len(ids) != len(ps):
                raise ValueError(f"row {r}: {len(ids)} token ids but {len(ps)} probabilities")
        row_ptr = torch.zeros(len(counts) + 1, dtype=torch.int64)
        row_ptr[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        flat_ids = [int(t) for ids in ids_per_row for t in ids]
        flat_ps = [float(p) for ps in probs_per_row for p in ps]
        return cls(row_ptr.to(device), torch.tensor(flat_ids, dtype=torch.int64, device=device),
                   torch.tensor(flat_ps, dtype=torch.float32, device=device))

    @classmethod
    def from_labels(cls, labels: torch.Tensor, ignore_index: int = -100) -> "SparseTargets":
        """Hard targets (one entry with probability 1 per row; rows labelled ignore_index get
        no entry). Boolean indexing syncs on CUDA: data preparation only."""
        keep = labels != ignore_index
        row_ptr = torch.zeros(labels.numel() + 1, dtype=torch.int64, device=labels.device)
        row_ptr[1:] = keep.to(torch.int64).cumsum(0)
        ids = labels[keep].to(torch.int64)
        return cls(row_ptr, ids, torch.ones(ids.numel(), dtype=torch.float32, device=labels.device))


# ------------------------------------------------------------------------------------------------
# Validation

def _check_args(targets, N: int, device, tau, weights, reduction: str, backend: str) -> None:
    """Checks that need no host sync (shapes, dtypes, devices, options)."""
    if not isinstance(targets, SparseTargets):
        raise ValueError(f"targets must be a calft.losses.SparseTargets, got {type(targets).__name__}")
    if targets.num_rows != N:
        raise ValueError(f"targets have {targets.num_rows} rows (row_ptr has {targets.num_rows + 1} "
                         f"entries) but the input has N={N} rows")
    if targets.row_ptr.device != device:
        raise ValueError(f"targets are on {targets.row_ptr.device} but the input is on {device}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau < float("inf")):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (N,):
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"weights must be a tensor of shape ({N},), got {shape}")
        if weights.device != device or not weights.is_floating_point():
            raise ValueError(f"weights must be a floating tensor on {device}, got {weights.dtype} "
                             f"on {weights.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _entry_rows(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """Row of every CSR entry (int64 [nnz]), by binary search: shape-static, no host sync."""
    entries = torch.arange(nnz, device=row_ptr.device, dtype=torch.int64)
    return torch.searchsorted(row_ptr, entries, right=True) - 1


def validate_targets(targets: SparseTargets, vocab_size: int, weights=None) -> None:
    """Value checks; raise ValueError naming the first offending row. One host sync when the
    targets are valid (all conditions are reduced on the device first)."""
    rp, ids, probs = targets.row_ptr, targets.token_ids, targets.probs
    nnz = ids.numel()
    rows = _entry_rows(rp, nnz)
    key = rows * vocab_size + ids
    sorted_key = key.sort().values
    flags = torch.stack([
        rp[0] != 0,
        rp[-1] != nnz,
        (rp[1:] < rp[:-1]).any(),
        ((ids < 0) | (ids >= vocab_size)).any(),
        (~torch.isfinite(probs) | (probs < 0)).any(),
        (sorted_key[1:] == sorted_key[:-1]).any(),
        (~torch.isfinite(weights)).any() if weights is not None else rp[0] != rp[0],
    ]).tolist()
    if not any(flags):
        return
    bad_start, bad_end, not_monotone, bad_id, bad_prob, duplicate, bad_weight = flags
    if bad_start:
        raise ValueError(f"targets.row_ptr[0] must be 0, got {int(rp[0])} (row 0)")
    if not_monotone:
        r = int(torch.nonzero(rp[1:] < rp[:-1])[0])
        raise ValueError(f"targets.row_ptr is not monotone at row {r}: row_ptr[{r}]={int(rp[r])} > "
                         f"row_ptr[{r + 1}]={int(rp[r + 1])}")
    if bad_end:
        raise ValueError(f"targets.row_ptr[N]={int(rp[-1])} does not match the {nnz} entries "
                         f"(row {targets.num_rows - 1} ends past or before the data)")
    if bad_id:
        j = int(torch.nonzero((ids < 0) | (ids >= vocab_size))[0])
        raise ValueError(f"row {int(rows[j])}: token id {int(ids[j])} (entry {j}) is outside "
                         f"[0, {vocab_size})")
    if bad_prob:
        j = int(torch.nonzero(~torch.isfinite(probs) | (probs < 0))[0])
        raise ValueError(f"row {int(rows[j])}: target probability {float(probs[j])} (entry {j}) "
                         "is negative or not finite")
    if duplicate:
        k = int(sorted_key[1:][sorted_key[1:] == sorted_key[:-1]][0])
        raise ValueError(f"row {k // vocab_size}: token id {k % vocab_size} appears more than once")
    if bad_weight:
        r = int(torch.nonzero(~torch.isfinite(weights))[0])
        raise ValueError(f"row {r}: weight {float(weights[r])} is not finite")


# ------------------------------------------------------------------------------------------------
# References (the test oracle): one row at a time, straight from the definition.

def soft_target_kl_ref(logits, targets: SparseTargets, *, tau=1.0, weights=None, reduction="mean"):
    """KL_r = sum_S q (log q - log_softmax(z_r/tau)_S), in the logits' dtype (pass float64)."""
    logp = torch.log_softmax(logits / tau, dim=-1)
    bounds = targets.row_ptr.tolist()
    rows = []
    for r, logp_r in enumerate(logp.unbind(0)):  # unbind: one [N, V] gradient, not N of them
        a, b = bounds[r], bounds[r + 1]
        q = targets.probs[a:b].to(logp.dtype)
        lp = logp_r.index_select(0, targets.token_ids[a:b])
        pos = q > 0
        rows.append(torch.where(pos, q * (torch.log(torch.where(pos, q, 1)) - lp), 0).sum())
    kl = torch.stack(rows) if rows else logp.new_zeros(0)
    return _reduce(kl, weights, reduction)


def linear_soft_target_kl_ref(hidden, lm_weight, targets, *, bias=None, tau=1.0, weights=None,
                              reduction="mean"):
    """soft_target_kl_ref of the materialized logits hidden @ lm_weight^T (+ bias)."""
    logits = hidden @ lm_weight.t()
    if bias is not None:
        logits = logits + bias
    return soft_target_kl_ref(logits, targets, tau=tau, weights=weights, reduction=reduction)


def _reduce(kl, weights, reduction):
    if weights is not None:
        kl = kl * weights.to(kl.dtype)
    if reduction == "none":
        return kl
    total = kl.sum()
    return total / kl.shape[0] if reduction == "mean" and kl.shape[0] > 0 else total


# ------------------------------------------------------------------------------------------------
# Torch path: vectorized over rows (no Python loop over rows), processed in row chunks that reuse
# one [C, V] buffer. On a CPU every fresh large tensor costs page faults (glibc maps blocks above
# 32 MiB anew each time), so a reused, cache-sized buffer is both leaner and ~3x faster than
# whole-[N, V] temporaries. Same steps as the kernels: forward (M, log S) per row and the K-way
# gather; backward m softmax c densely, then the K target entries overwritten with exact values.

def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_rows(N: int, V: int, device: torch.device, chunk_rows=None, linear=False) -> int:
    """Rows per chunk: [C, V] of ~4 MiB fp32 on a CPU (stays in cache across the in-place
    passes); 64 MiB for the linear loss (every chunk rereads W and read-modify-writes the fp32
    dW, so few big chunks; 88 rows x V=151936 is one chunk) and on a GPU (few launches)."""
    if chunk_rows is None:
        budget = 2**24 if device.type == "cuda" or linear else 2**20
        chunk_rows = budget // max(V, 1)
    return max(1, min(N, chunk_rows))


def _finite_or_zero(x):
    """log S of an all -inf row is -inf (and so is its max); 0 instead keeps exp() = 0, not NaN."""
    return torch.where(x == float("-inf"), 0, x)


def _kl_from_parts(zt, m_ref, log_s, rows, q, N):
    """KL_r = sum_S q (log q - (z_k/tau - M_r)) + m_r log S_r, since log p = z/tau - M - log S.

    Keeping lse = M + log S in two parts keeps |z| ~ 1e4 accurate: z_k/tau - M is exact-ish
    and log S is O(log V). Returns (kl [N], mass [N])."""
    pos = q > 0
    shifted = torch.where(pos, zt - m_ref[rows], 0)  # no 0 * inf where q = 0 and z = -inf
    terms = torch.where(pos, q * (torch.log(torch.where(pos, q, 1)) - shifted), 0)
    kl = torch.zeros(N, dtype=q.dtype, device=q.device).index_add_(0, rows, terms)
    mass = torch.zeros(N, dtype=q.dtype, device=q.device).index_add_(0, rows, q)
    # "!= 0" rather than "> 0": 0 * -inf is avoided for empty rows, a NaN mass still shows.
    return kl + torch.where(mass != 0, mass * log_s, 0), mass


def _target_grads(zt, m_ref, log_s, mass, rows, q, c):
    """Exact (m exp(z_k/tau - M - log S) - q_k) c for every entry, in the compute dtype."""
    p = torch.exp((zt - m_ref[rows]) - _finite_or_zero(log_s)[rows])
    return (mass[rows] * p - q) * c[rows]


def _shifted_into(buf, z, tau, shift):
    """buf = z / tau - shift[:, None] in buf's (compute) dtype, one pass when the dtypes match
    (z is upcast before any arithmetic otherwise); z may be buf itself."""
    if z.dtype == buf.dtype:
        if tau == 1:
            return torch.sub(z, shift[:, None], out=buf)
        return torch.div(z, tau, out=buf).sub_(shift[:, None])
    buf.copy_(z)
    return (buf.div_(tau) if tau != 1 else buf).sub_(shift[:, None])


class _SoftTargetKLTorch(torch.autograd.Function):
    """Per-row KL of logits [N, V] (compute dtype [N]); backward (m softmax - q)/tau * dL/dKL."""

    @staticmethod
    def forward(ctx, logits, row_ptr, token_ids, probs, tau, inplace):
        cdt = _compute_dtype(logits)
        N, V = logits.shape
        C = _chunk_rows(N, V, logits.device)
        m_ref = torch.empty(N, dtype=cdt, device=logits.device)
        log_s = torch.empty_like(m_ref)
        buf = torch.empty(C, V, dtype=cdt, device=logits.device)
        for c0 in range(0, N, C):
            z = logits[c0:c0 + C]
            n = z.shape[0]
            m = _finite_or_zero(z.amax(dim=1).to(cdt) / tau)  # max(z/tau) = max(z)/tau, tau > 0
            m_ref[c0:c0 + n] = m
            e = _shifted_into(buf[:n], z, tau, m).exp_()
            log_s[c0:c0 + n] = e.sum(dim=1).log()
        rows = _entry_rows(row_ptr, token_ids.numel())
        q = probs.to(cdt)
        zt = logits[rows, token_ids].to(cdt) / tau
        kl, mass = _kl_from_parts(zt, m_ref, log_s, rows, q, N)
        ctx.save_for_backward(logits, rows, token_ids, q, zt, m_ref, log_s, mass)
        ctx.tau, ctx.inplace, ctx.C = tau, inplace, C
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        logits, rows, token_ids, q, zt, m_ref, log_s, mass = ctx.saved_tensors
        tau, C = ctx.tau, ctx.C
        cdt = q.dtype
        c = grad_kl.to(cdt) / tau
        coef = mass * c
        log_s_ref = _finite_or_zero(log_s)
        grad = logits if ctx.inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        direct = grad.dtype == cdt  # compute straight into the output, else via an fp32 buffer
        buf = None if direct else torch.empty(C, logits.shape[1], dtype=cdt, device=logits.device)
        for c0 in range(0, logits.shape[0], C):
            z, out = logits[c0:c0 + C], grad[c0:c0 + C]
            n = z.shape[0]
            dst = _shifted_into(out if direct else buf[:n], z, tau, m_ref[c0:c0 + n])
            dst.sub_(log_s_ref[c0:c0 + n, None]).exp_()
            dst.mul_(coef[c0:c0 + n, None])
            if not direct:
                out.copy_(dst)
        # The targets get the exact fp32 value, rounded once (no m p c - q c cancellation in bf16).
        grad.index_put_((rows, token_ids), _target_grads(zt, m_ref, log_s, mass, rows, q, c).to(grad.dtype))
        return grad, None, None, None, None, None


class _LinearSoftTargetKLTorch(torch.autograd.Function):
    """Per-row KL of hidden @ W^T (+ b), chunked over rows; backward recomputes each chunk.

    Extra memory: one [C, V] buffer plus the dW accumulator; never [N, V]. Low-precision
    inputs are upcast (hidden per chunk, W and b once)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_ptr, token_ids, probs, tau, chunk_rows):
        cdt = _compute_dtype(hidden)
        N, H = hidden.shape
        V = weight.shape[0]
        w = weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        C = _chunk_rows(N, V, hidden.device, chunk_rows, linear=True)
        m_ref = torch.empty(N, dtype=cdt, device=hidden.device)
        log_s = torch.empty_like(m_ref)
        buf = torch.empty(C, V, dtype=cdt, device=hidden.device)
        for c0 in range(0, N, C):
            z = _chunk_logits(buf, hidden[c0:c0 + C], w, b, tau)
            n = z.shape[0]
            m = _finite_or_zero(z.amax(dim=1))
            m_ref[c0:c0 + n] = m
            log_s[c0:c0 + n] = z.sub_(m[:, None]).exp_().sum(dim=1).log()
        # One chunk (a calibration batch: N ~ 88): keep exp(z/tau - M) for the backward instead
        # of recomputing it, one matmul fewer; the memory is the same [C, V] buffer.
        ctx.exp_shifted = buf if C >= N and any(ctx.needs_input_grad[:3]) else None
        rows = _entry_rows(row_ptr, token_ids.numel())
        # Target logits z_k = h_r . W[t_k] + b[t_k], gathered in blocks of entries (E x H each).
        zt = torch.empty(token_ids.numel(), dtype=cdt, device=hidden.device)
        E = max(1, 2**22 // max(H, 1))
        for e0 in range(0, token_ids.numel(), E):
            r, t = rows[e0:e0 + E], token_ids[e0:e0 + E]
            zk = (hidden[r].to(cdt) * w[t]).sum(dim=1)
            zt[e0:e0 + E] = (zk + b[t] if b is not None else zk) / tau
        q = probs.to(cdt)
        kl, mass = _kl_from_parts(zt, m_ref, log_s, rows, q, N)
        ctx.save_for_backward(hidden, weight, bias, rows, token_ids, q, zt, m_ref, log_s, mass)
        ctx.tau, ctx.C = tau, C
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, bias, rows, token_ids, q, zt, m_ref, log_s, mass = ctx.saved_tensors
        tau, C = ctx.tau, ctx.C
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = q.dtype
        N, H = hidden.shape
        w = weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        c = grad_kl.to(cdt) / tau
        coef = mass * c
        log_s = _finite_or_zero(log_s)
        # Target entries: G = m p c - q c there; added as -q c to the dense m p c of the chunk.
        q_scaled = -q * c[rows]
        d_h = torch.empty(N, H, dtype=cdt, device=hidden.device) if need_h else None
        d_w = torch.empty_like(w) if need_w else None  # first chunk writes, later ones add
        d_b = torch.empty_like(b) if need_b else None
        cached, ctx.exp_shifted = ctx.exp_shifted, None  # consumed: a second backward recomputes
        buf = cached if cached is not None else torch.empty(C, w.shape[0], dtype=cdt, device=hidden.device)
        for c0 in range(0, N, C):
            h = hidden[c0:c0 + C].to(cdt)
            if cached is not None:  # exp(z/tau - M) from the forward: scale by c m / S
                g = cached.mul_((coef * torch.exp(-log_s))[:, None])
            else:
                g = _chunk_logits(buf, h, w, b, tau)
                g.sub_(m_ref[c0:c0 + C, None]).sub_(log_s[c0:c0 + C, None]).exp_()
                g.mul_(coef[c0:c0 + C, None])
            n = g.shape[0]
            # Entries of other rows add 0 at a clamped position: shape-static, no host sync.
            local = rows - c0
            inside = (local >= 0) & (local < n)
            g.index_put_((local.clamp(0, n - 1), token_ids), torch.where(inside, q_scaled, 0),
                         accumulate=True)
            if need_h:
                torch.mm(g, w, out=d_h[c0:c0 + n])
            if need_w:
                torch.mm(g.t(), h, out=d_w) if c0 == 0 else d_w.addmm_(g.t(), h)
            if need_b:
                torch.sum(g, dim=0, out=d_b) if c0 == 0 else d_b.add_(g.sum(dim=0))
        return (d_h.to(hidden.dtype) if need_h else None, d_w.to(weight.dtype) if need_w else None,
                d_b.to(bias.dtype) if need_b else None, None, None, None, None, None)


def _chunk_logits(buf, h, w, b, tau):
    """z/tau for a block of rows, written into buf[:rows] ([C, V], w's dtype)."""
    out = buf[: h.shape[0]]
    h = h.to(w.dtype)
    torch.addmm(b, h, w.t(), out=out) if b is not None else torch.mm(h, w.t(), out=out)
    return out.div_(tau) if tau != 1 else out


# ------------------------------------------------------------------------------------------------
# Public API

def _pick_backend(backend: str, x: torch.Tensor) -> str:
    """The one place the backend is chosen: Triton for CUDA tensors of a kernel dtype."""
    if backend == "auto":
        kernel_dtype = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        return "triton" if x.is_cuda and kernel_dtype else "torch"
    return backend


def soft_target_kl(logits, targets: SparseTargets, *, tau=1.0, weights=None, reduction="mean",
                   backend="auto", validate=True, inplace_grad=False):
    """Sparse soft-target KL of logits [N, V] (module docstring for the math and conventions).

    validate=False skips the value checks (and their host sync); inplace_grad=True makes the
    backward overwrite `logits` with its gradient (only when nothing else needs the logits)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError("logits must be a floating tensor of shape [N, V]")
    N, V = logits.shape
    if V == 0:
        raise ValueError("logits have V=0 columns: the vocabulary must hold at least one token")
    _check_args(targets, N, logits.device, tau, weights, reduction, backend)
    if validate:
        validate_targets(targets, V, weights)
    args = (logits, targets.row_ptr, targets.token_ids, targets.probs, float(tau), inplace_grad)
    if _pick_backend(backend, logits) == "triton":
        from calft.kernels.sparse_kl import SoftTargetKLFunction

        kl = SoftTargetKLFunction.apply(*args)
    else:
        kl = _SoftTargetKLTorch.apply(*args)
    return _reduce(kl, weights, reduction)


def linear_soft_target_kl(hidden, lm_weight, targets: SparseTargets, *, bias=None, tau=1.0,
                          weights=None, reduction="mean", backend="auto", validate=True,
                          chunk_size=None):
    """The same loss for logits = hidden [N, H] @ lm_weight[V, H]^T (+ bias [V]), computed
    without holding [N, V]. chunk_size overrides the block: rows per chunk on the torch path,
    vocabulary columns per backward chunk on the Triton path (None = from the shapes)."""
    for name, t, dim in (("hidden", hidden, 2), ("lm_weight", lm_weight, 2), ("bias", bias, 1)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != dim or not t.is_floating_point():
            raise ValueError(f"{name} must be a {dim}-D floating tensor")
        if t.dtype != hidden.dtype or t.device != hidden.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but hidden is {hidden.dtype} "
                             f"on {hidden.device}")
    N, H = hidden.shape
    V = lm_weight.shape[0]
    if V == 0:
        raise ValueError("lm_weight has V=0 rows: the vocabulary must hold at least one token")
    if lm_weight.shape[1] != H:
        raise ValueError(f"lm_weight has shape {tuple(lm_weight.shape)}; expected [V, {H}]")
    if bias is not None and bias.shape[0] != V:
        raise ValueError(f"bias has {bias.shape[0]} entries; expected V={V}")
    _check_args(targets, N, hidden.device, tau, weights, reduction, backend)
    if validate:
        validate_targets(targets, V, weights)
    args = (hidden, lm_weight, bias, targets.row_ptr, targets.token_ids, targets.probs,
            float(tau), chunk_size)
    if _pick_backend(backend, hidden) == "triton":
        from calft.kernels.linear_sparse_kl import LinearSoftTargetKLFunction

        kl = LinearSoftTargetKLFunction.apply(*args)
    else:
        kl = _LinearSoftTargetKLTorch.apply(*args)
    return _reduce(kl, weights, reduction)
