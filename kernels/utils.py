"""Helpers shared by the kernel families in `calft.kernels` (nothing op-specific lives here).

* `is_interpreter()`: whether Triton runs kernels on the CPU (TRITON_INTERPRET=1). The
  interpreter cannot do bf16 arithmetic, so kernels take an `UPCAST` constexpr that widens bf16
  operands to fp32 before `tl.dot`; on a GPU the bf16 operands go to the tensor cores directly
  (a bf16 x bf16 product is exact in fp32 and the accumulation is fp32, so both give fp32 math
  up to summation order).
* `online_lse_update`: one step of the streaming ("online") logsumexp of Milakov & Gimelshein,
  "Online normalizer calculation for softmax" (arXiv 1805.02867), with the -inf guards that the
  textbook version lacks.
* `row_lse_from_partials`, `load_target_block`, `store_row_kl`: the prologue, the per-step target
  gather and the epilogue that the two forward kernels (sparse_kl over given logits,
  linear_sparse_kl over h W^T) share; only how z_k is obtained differs between them.
* Launch heuristics: one config per kernel chosen from the shape (no multi-config autotune: it
  needs a CPU `do_bench` in the interpreter, and a single documented choice is reproducible).
"""
import os

import torch
import triton
import triton.language as tl

# Dtypes the kernels read. Everything is computed in fp32 inside the kernels.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_interpreter() -> bool:
    """True when Triton kernels run in the numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Raise ValueError unless the tensors can be handed to a Triton kernel."""
    for t in tensors:
        if t is not None and not t.is_cuda and not is_interpreter():
            raise ValueError(
                f"the Triton kernels need CUDA tensors (got a {t.device} tensor); on CPU use "
                "backend='torch', or set TRITON_INTERPRET=1 before importing calft.kernels"
            )


def num_programs_target(device: torch.device) -> int:
    """How many programs a launch should have to fill the device: 4 per SM on a GPU (enough
    to hide latency without tiny programs), 1 in the interpreter (programs run one by one)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def split_vocab(V: int, block_v: int, rows_parallel: int, target_programs: int,
                num_splits: int | None = None) -> tuple[int, int]:
    """Split the vocabulary into `num_splits` contiguous ranges of `split_v` entries (a multiple
    of block_v) so that rows_parallel x num_splits programs reach target_programs.

    Returns (split_v, num_splits) with num_splits = cdiv(V, split_v) >= 1.
    """
    num_tiles = triton.cdiv(max(V, 1), block_v)
    if num_splits is None:
        num_splits = triton.cdiv(target_programs, max(rows_parallel, 1))
    num_splits = max(1, min(num_splits, num_tiles))
    split_v = triton.cdiv(num_tiles, num_splits) * block_v
    return split_v, triton.cdiv(max(V, 1), split_v)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: full IEEE fp32 for fp32 operands (the default would be TF32 on
    a GPU, ~1e-3 relative error, which breaks "same numbers on CPU and GPU"); for 16-bit
    operands the option is irrelevant and the default is passed."""
    return "ieee" if (dtype == torch.float32 or is_interpreter()) else "tf32"


@triton.jit
def online_lse_update(m, s, x):
    """Fold a 1-D tile x into the running (max m: scalar, sums s: one per lane) of a logsumexp.

    Invariant: sum(s) = sum exp(x_seen - m). One exp per element (plus one per tile for the
    rescale): at 2 exp per element the MUFU units, not HBM, would bound a bf16 stream on H100/
    H200. Both m and the tile max may be -inf (masked lanes, -inf logits); exp(-inf - -inf)
    would be NaN, so the reference is 0 while nothing finite has been seen (then alpha = 0 and
    every term is exp(-inf) = 0).
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_ref = tl.where(m_new != float("-inf"), m_new, 0.0)
    return m_new, s * tl.exp(m - m_ref) + tl.exp(x - m_ref)


@triton.jit
def combine_lse(m, s, axis: tl.constexpr):
    """Reduce running (max, sum) pairs along `axis` into one (max, sum) pair (same -inf guards)."""
    m_all = tl.max(m, axis=axis)
    m_ref = tl.where(m_all != float("-inf"), m_all, 0.0)
    if axis == 0:
        scale = tl.exp(m - m_ref)
    else:
        scale = tl.exp(m - m_ref[:, None])
    scale = tl.where(m != float("-inf"), scale, 0.0)
    return m_all, tl.sum(s * scale, axis=axis)


@triton.jit
def row_lse_from_partials(part_max_ptr, part_sum_ptr, row, num_splits, BLOCK_S: tl.constexpr):
    """(M_ref, S) of row `row` from its `num_splits` partial (max, sum) pairs.

    M_ref is the row max, or 0 for a row of all -inf (so no -inf - -inf appears downstream);
    S = sum exp(z/tau - M_ref) (0 for such a row).
    """
    offs_s = tl.arange(0, BLOCK_S)
    pm = tl.load(part_max_ptr + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    ps = tl.load(part_sum_ptr + row * num_splits + offs_s, mask=offs_s < num_splits, other=0.0)
    m_row, s_row = combine_lse(pm, ps, 0)
    return tl.where(m_row != float("-inf"), m_row, 0.0), s_row


@triton.jit
def load_target_block(ids_ptr, probs_ptr, k0, end, V, BLOCK_K: tl.constexpr):
    """Entries k0 .. k0+BLOCK_K-1 of a CSR row ending at `end`: (k, k_ok, ids, q fp32, ok).

    A row with K entries takes cdiv(K, BLOCK_K) of these steps (K up to ~1000 for 3-digit
    tokenizers). `ok` also masks ids outside [0, V): with validate=False a bad id must never
    be gathered (an unmasked out-of-range load can crash the process).
    """
    k = k0 + tl.arange(0, BLOCK_K)
    k_ok = k < end
    ids = tl.load(ids_ptr + k, mask=k_ok, other=0)
    q = tl.load(probs_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    ok = k_ok & (ids >= 0) & (ids < V)
    return k, k_ok, ids, q, ok


@triton.jit
def store_row_kl(loss_ptr, lse_ptr, mass_ptr, row, acc, mass, m_ref, s_row):
    """KL_r = sum(acc) + m log S, and the saved (M, log S), m of row `row`.

    m log S is 0 (not 0 * -inf) for rows without entries; "!= 0" lets a NaN mass (unvalidated)
    show. lse is kept as (M, log S): one fp32 number M + log S would lose log S's digits when
    |M| ~ 1e4 (ulp 1e-3), and the backward's softmax with them.
    """
    m_sum = tl.sum(mass, axis=0)
    kl = tl.sum(acc, axis=0) + tl.where(m_sum != 0, m_sum * tl.log(s_row), 0.0)
    tl.store(loss_ptr + row, kl)
    tl.store(lse_ptr + 2 * row, m_ref)
    tl.store(lse_ptr + 2 * row + 1, tl.log(s_row))
    tl.store(mass_ptr + row, m_sum)
