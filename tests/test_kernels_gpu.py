"""The compiled Triton kernels on a CUDA device against the float64 reference, every dtype.

Run by benchmarks/gpu_check.sh with TRITON_INTERPRET=0 (tests/conftest.py only sets it when it
is unset); skipped on CPU-only machines and under the interpreter. Tolerances: fp32 math in the
kernels, so fp32 inputs are held to ~1e-5; 16-bit inputs to twice torch's own error at the same
precision (the dense logits in that dtype), the repository's test rule.
"""
import os

import pytest
import torch

from calft.losses import (linear_soft_target_kl, linear_soft_target_kl_ref, soft_target_kl,
                          soft_target_kl_ref)
from test_losses import as64, assert_close, make_targets, max_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="needs the compiled kernels (TRITON_INTERPRET=0)"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ref(fn, tensors):
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("K", [11, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_kl_cuda(dtype, K):
    N, V = 96, 32003
    t = make_targets(N, V, [K] * (N - 1) + [0], seed=K)
    z = (torch.randn(N, V, generator=torch.Generator().manual_seed(K)) * 3).to(dtype)
    ref, (gref,) = _ref(lambda x: soft_target_kl_ref(x, as64(t), tau=0.9), [z])
    zz = z.cuda().requires_grad_()
    loss = soft_target_kl(zz, t.to("cuda"), tau=0.9, backend="triton")
    loss.backward()
    zt = z.cuda().requires_grad_()  # torch's own error at this precision
    soft_target_kl(zt, t.to("cuda"), tau=0.9, backend="torch").backward()
    assert_close(loss.cpu(), ref, rtol=1e-5, atol=1e-5, name=f"loss {dtype}")  # fp32 math
    if dtype == torch.float32:
        assert_close(zz.grad.cpu(), gref, rtol=1e-4, atol=1e-8, name="dlogits fp32")
    else:
        assert max_err(zz.grad.cpu(), gref) <= 2 * max_err(zt.grad.cpu(), gref) + 1e-6, dtype


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("K", [11, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_sparse_kl_cuda(dtype, K, bias):
    N, V, H = 300, 50000, 256
    g = torch.Generator().manual_seed(7 + K)
    t = make_targets(N, V, [K] * (N - 2) + [0, 1], seed=K)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    ref, grefs = _ref(lambda hh, ww, bb: linear_soft_target_kl_ref(hh, ww, as64(t), bias=bb), [h, w, b])
    leaves = [x.cuda().requires_grad_() if x is not None else None for x in (h, w, b)]
    loss = linear_soft_target_kl(leaves[0], leaves[1], t.to("cuda"), bias=leaves[2], backend="triton")
    loss.backward()
    base = [x.cuda().requires_grad_() if x is not None else None for x in (h, w, b)]
    linear_soft_target_kl(base[0], base[1], t.to("cuda"), bias=base[2], backend="torch").backward()
    assert_close(loss.cpu(), ref, rtol=1e-4, atol=1e-4, name=f"loss {dtype}")
    for name, ours, theirs, gr in zip(("dhidden", "dweight", "dbias"), leaves, base, grefs):
        if gr is None:
            continue
        if dtype == torch.float32:
            assert_close(ours.grad.cpu(), gr, rtol=1e-4, atol=1e-5 * float(gr.abs().max()), name=name)
        else:
            assert max_err(ours.grad.cpu(), gr) <= 2 * max_err(theirs.grad.cpu(), gr) + 1e-5, (name, dtype)
