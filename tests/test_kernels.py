"""Triton kernels (calft.kernels) against the float64 reference, under TRITON_INTERPRET=1.

Shapes are small (the interpreter runs at numpy speed) but chosen to hit every code path:
several vocabulary tiles and splits, V prime or smaller than a block, H not a multiple of
BLOCK_H, K larger than BLOCK_K, several row blocks and backward vocabulary chunks, rows
without targets, q = 0 entries, -inf logits. The launch overrides (block_v, num_splits,
block_n, chunk_v) force those paths; the heuristics are exercised through calft.losses.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first kernel import

import pytest
import torch
import torch.nn.functional as F

from calft.kernels.linear_sparse_kl import linear_sparse_kl_backward, linear_sparse_kl_forward
from calft.kernels.sparse_kl import SoftTargetKLFunction
from calft.losses import (SparseTargets, linear_soft_target_kl, linear_soft_target_kl_ref,
                          soft_target_kl, soft_target_kl_ref)
from test_losses import as64, assert_close, dense_linear_kl, make_targets, max_err, ref_loss_and_grads

# (N, V, counts, block_v, num_splits): heuristic launch; prime V over 5 tiles in 3 splits;
# V smaller than one block; K = 150 > BLOCK_K = 64 with an empty row.
SPARSE_CASES = [
    (7, 300, None, None, None),
    (5, 257, None, 64, 3),
    (3, 13, [13, 0, 2], None, None),
    (4, 300, [150, 0, 70, 3], 128, 2),
]


@pytest.mark.parametrize("N,V,counts,block_v,num_splits", SPARSE_CASES)
def test_sparse_kl_fp32_matches_float64(N, V, counts, block_v, num_splits):
    t = make_targets(N, V, counts, seed=V, zero_prob_entry=True)
    g = torch.Generator().manual_seed(N)
    z = torch.randn(N, V, generator=g) * 3
    z[0, t.token_ids[t.row_ptr[0]:t.row_ptr[1]].max() + 1:] = float("-inf")  # -inf off the support
    grad_out = torch.randn(N, generator=g)
    zz = z.clone().requires_grad_()
    kl = SoftTargetKLFunction.apply(zz, t.row_ptr, t.token_ids, t.probs, 0.7, False, block_v, num_splits)
    kl.backward(grad_out)
    ref, (gref,) = ref_loss_and_grads([z], lambda x: soft_target_kl_ref(x, as64(t), tau=0.7, reduction="none"),
                                      grad_out)
    assert_close(kl, ref, rtol=1e-5, atol=1e-6, name="kl")  # fp32
    assert_close(zz.grad, gref, rtol=1e-5, atol=1e-7, name="dlogits")  # fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_kl_low_precision_within_twice_torch_error(dtype):
    N, V = 8, 300
    t = make_targets(N, V, seed=21)
    z = (torch.randn(N, V, generator=torch.Generator().manual_seed(21)) * 3).to(dtype)
    w = torch.rand(N, generator=torch.Generator().manual_seed(22))
    ref, (gref,) = ref_loss_and_grads([z], lambda x: soft_target_kl_ref(x, as64(t), weights=w.double()))
    zz = z.clone().requires_grad_()
    loss = soft_target_kl(zz, t, weights=w, backend="triton")
    loss.backward()
    # Torch's own low-precision computation: log_softmax and the loss in `dtype`.
    zt = z.clone().requires_grad_()
    rows = torch.repeat_interleave(torch.arange(N), t.row_ptr.diff())
    q = t.probs.to(dtype)
    torch_kl = torch.zeros(N, dtype=dtype).index_add(
        0, rows, torch.xlogy(q, q) - q * F.log_softmax(zt, dim=-1)[rows, t.token_ids])
    ((torch_kl * w.to(dtype)).sum() / N).backward()
    assert zz.grad.dtype == dtype
    assert max_err(loss, ref) <= 1e-5 * abs(float(ref)) + 1e-6  # fp32 math on the exact inputs
    assert max_err(zz.grad, gref) <= 2 * max_err(zt.grad, gref) + 1e-6


def test_sparse_kl_inplace_gradient_and_torch_agreement():
    N, V = 6, 300
    t = make_targets(N, V, seed=23)
    z = torch.randn(N, V, generator=torch.Generator().manual_seed(23)) * 2
    base = z.clone().requires_grad_()
    logits = base * 1.0  # non-leaf, as an LM head output
    loss = soft_target_kl(logits, t, tau=1.3, backend="triton", inplace_grad=True)
    loss.backward()
    zt = z.clone().requires_grad_()
    loss_torch = soft_target_kl(zt, t, tau=1.3, backend="torch")
    loss_torch.backward()
    assert_close(loss, loss_torch, rtol=1e-6, atol=1e-7, name="triton vs torch loss")
    assert_close(logits.detach(), zt.grad, rtol=1e-5, atol=1e-8, name="logits overwritten by the gradient")
    assert_close(base.grad, zt.grad, rtol=1e-5, atol=1e-8, name="gradient")


# K up to 1000 entries per row (docs/method.md, section 'Trie targets': 3-digit tokens, as Llama-3 and gpt-oss split
# numbers, branch up to ~1000 per node): 16 passes of BLOCK_K = 64 in the standalone kernel,
# 32 of GATHER_BLOCK_K = 32 in the fused one, next to a short row and an empty one. V = 1031
# (prime) keeps every id distinct; N and H stay small for the interpreter.
K1000_COUNTS = [1000, 3, 0]


def test_sparse_kl_k1000_matches_float64():
    N, V = 3, 1031
    t = make_targets(N, V, K1000_COUNTS, seed=1000, zero_prob_entry=True)
    assert int(t.row_ptr.diff().max()) == 1000
    g = torch.Generator().manual_seed(1000)
    z = torch.randn(N, V, generator=g) * 3
    grad_out = torch.randn(N, generator=g)
    zz = z.clone().requires_grad_()
    kl = SoftTargetKLFunction.apply(zz, t.row_ptr, t.token_ids, t.probs, 0.9, False, 256, 2)
    kl.backward(grad_out)
    ref, (gref,) = ref_loss_and_grads([z], lambda x: soft_target_kl_ref(x, as64(t), tau=0.9, reduction="none"),
                                      grad_out)
    assert_close(kl, ref, rtol=1e-5, atol=1e-5, name="kl, K=1000")  # fp32, 1000-term sums
    assert_close(zz.grad, gref, rtol=1e-5, atol=1e-7, name="dlogits, K=1000")  # fp32


@pytest.mark.parametrize("bias_kind", [None, "randn"])
def test_linear_sparse_kl_k1000_matches_float64(bias_kind):
    N, V, H = 3, 1031, 24
    t = make_targets(N, V, K1000_COUNTS, seed=1001)
    h, w, b = _linear_inputs(N, V, H, bias_kind, seed=1001)
    grad_out = torch.randn(N, generator=torch.Generator().manual_seed(2))
    kl, lse, mass, zt = linear_sparse_kl_forward(h, w, b, t.row_ptr, t.token_ids, t.probs, 1.0, num_splits=2)
    dh, dw, db = linear_sparse_kl_backward(h, w, b, t.row_ptr, t.token_ids, t.probs, lse, mass, zt, grad_out,
                                           1.0, chunk_v=512)
    ref, grefs = ref_loss_and_grads(
        [h, w, b], lambda hh, ww, bb: linear_soft_target_kl_ref(hh, ww, as64(t), bias=bb, reduction="none"),
        grad_out)
    assert_close(kl, ref, rtol=1e-5, atol=1e-5, name="kl, K=1000")  # fp32
    for name, got, gr in zip(("dhidden", "dweight", "dbias"), (dh, dw, db), grefs):
        if gr is not None:  # fp32, normwise as in test_linear_sparse_kl_fp32_matches_float64
            assert_close(got, gr, rtol=1e-5, atol=1e-5 * float(gr.abs().max()), name=name + ", K=1000")
        else:
            assert got is None


# (N, V, H, bias, counts, overrides): heuristic launch; 2 row blocks x 2 splits with 5 backward
# chunks of 64 columns, no bias; V < block and H = 17 (not a multiple of BLOCK_H); K = 90 > the
# gather block, and -inf bias entries (a masked vocabulary) off the support.
LINEAR_CASES = [
    (7, 300, 40, "randn", None, {}),
    (20, 257, 48, None, None, dict(block_n=16, block_v=64, num_splits=2, chunk_v=64)),
    (3, 13, 17, "randn", [13, 0, 4], {}),
    (5, 300, 24, "masked", [90, 0, 3, 1, 7], dict(block_v=128, chunk_v=128)),
]


def _linear_inputs(N, V, H, bias_kind, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 3
    b = None if bias_kind is None else torch.randn(V, generator=g)
    if bias_kind == "masked":
        b[200:] = float("-inf")
    return [x.to(dtype) if x is not None else None for x in (h, w, b)]


@pytest.mark.parametrize("N,V,H,bias_kind,counts,opts", LINEAR_CASES)
def test_linear_sparse_kl_fp32_matches_float64(N, V, H, bias_kind, counts, opts):
    t = make_targets(N, V if bias_kind != "masked" else 200, counts, seed=H, zero_prob_entry=True)
    h, w, b = _linear_inputs(N, V, H, bias_kind, seed=N * H)
    grad_out = torch.randn(N, generator=torch.Generator().manual_seed(1))
    opts = dict(opts)  # parametrize shares the dict between runs
    chunk_v = opts.pop("chunk_v", None)
    kl, lse, mass, zt = linear_sparse_kl_forward(h, w, b, t.row_ptr, t.token_ids, t.probs, 0.8, **opts)
    dh, dw, db = linear_sparse_kl_backward(h, w, b, t.row_ptr, t.token_ids, t.probs, lse, mass, zt,
                                           grad_out, 0.8, chunk_v=chunk_v, block_n=opts.get("block_n"),
                                           block_v=opts.get("block_v"))
    ref, grefs = ref_loss_and_grads(
        [h, w, b], lambda hh, ww, bb: linear_soft_target_kl_ref(hh, ww, as64(t), bias=bb, tau=0.8,
                                                                reduction="none"), grad_out)
    assert_close(kl, ref, rtol=1e-5, atol=1e-5, name="kl")  # fp32
    for name, got, gr in zip(("dhidden", "dweight", "dbias"), (dh, dw, db), grefs):
        if gr is not None:  # fp32, normwise: dW sums N products and cancels to ~1e-3 of its scale
            assert_close(got, gr, rtol=1e-5, atol=1e-5 * float(gr.abs().max()), name=name)
        else:
            assert got is None


def test_linear_public_api_bf16_within_twice_torch_error():
    N, V, H = 9, 300, 40
    t = make_targets(N, V, seed=31)
    h, w, b = _linear_inputs(N, V, H, "randn", seed=31, dtype=torch.bfloat16)
    ref, grefs = ref_loss_and_grads(
        [h, w, b], lambda hh, ww, bb: linear_soft_target_kl_ref(hh, ww, as64(t), bias=bb, tau=1.1))
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = linear_soft_target_kl(*leaves[:2], t, bias=leaves[2], tau=1.1, backend="triton")
    loss.backward()
    # Torch's own bf16: logits materialized in bf16, loss in fp32 (dense_linear_kl upcasts).
    base = [x.clone().requires_grad_() for x in (h, w, b)]
    dense_linear_kl(base[0], base[1], t, bias=base[2], tau=1.1).backward()
    assert max_err(loss, ref) <= 1e-5 * abs(float(ref)) + 1e-5  # fp32 math on exact bf16 values
    for name, ours, theirs, gr in zip(("dhidden", "dweight", "dbias"), leaves, base, grefs):
        assert ours.grad.dtype == torch.bfloat16, name
        assert max_err(ours.grad, gr) <= 2 * max_err(theirs.grad, gr) + 1e-6, name


def test_linear_frozen_head_and_hard_targets_equal_cross_entropy():
    N, V, H = 10, 97, 32
    h, w, _ = _linear_inputs(N, V, H, None, seed=41)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(41))
    labels[3] = -100
    t = SparseTargets.from_labels(labels)
    hh, hc = h.clone().requires_grad_(), h.clone().requires_grad_()
    ours = linear_soft_target_kl(hh, w, t, reduction="sum", backend="triton")  # w frozen
    ours.backward()
    ce = F.cross_entropy(hc @ w.T, labels, reduction="sum")
    ce.backward()
    assert_close(ours, ce, rtol=1e-5, atol=1e-5, name="loss vs cross_entropy")
    assert_close(hh.grad, hc.grad, rtol=1e-5, atol=1e-6, name="dhidden vs cross_entropy")
    assert w.grad is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_triton_matches_torch_path():
    N, V, H = 300, 50000, 512
    t = make_targets(N, V, seed=51).to("cuda")
    h, w, b = (x.cuda() for x in _linear_inputs(N, V, H, "randn", seed=51, dtype=torch.bfloat16))

    def run(backend):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        loss = linear_soft_target_kl(leaves[0], leaves[1], t, bias=leaves[2], backend=backend)
        loss.backward()
        z = (h @ w.T + b).float().requires_grad_()
        loss_z = soft_target_kl(z, t, backend=backend)
        loss_z.backward()
        return loss, [x.grad for x in leaves], loss_z, z.grad

    tri, ref = run("triton"), run("torch")
    assert_close(tri[0], ref[0], rtol=1e-3, atol=1e-3, name="linear loss (bf16 inputs)")
    for name, a, b_ in zip(("dh", "dw", "db"), tri[1], ref[1]):
        assert_close(a, b_, rtol=3e-2, atol=1e-4, name=name)  # bf16 gradients
    assert_close(tri[2], ref[2], rtol=1e-5, atol=1e-6, name="loss on logits")  # fp32
    assert_close(tri[3], ref[3], rtol=1e-4, atol=1e-7, name="dlogits")  # fp32
