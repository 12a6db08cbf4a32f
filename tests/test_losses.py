"""calft.losses: the torch path, the references, validation and dispatch (CPU).

Every check is against the float64 per-row reference `soft_target_kl_ref` (itself checked
against an independent dense formula and against F.cross_entropy). The Triton kernels are
tested in test_kernels.py, which reuses the helpers at the top of this file. The benchmark
baselines (`per_position_loop_kl`, `dense_kl`, `dense_linear_kl`) live here too, so the
numbers in benchmarks/kernels.py are for code whose correctness is tested.
"""
import pytest
import torch
import torch.nn.functional as F

from calft.losses import (SparseTargets, linear_soft_target_kl, linear_soft_target_kl_ref,
                          soft_target_kl, soft_target_kl_ref)

# ------------------------------------------------------------------------------------------------
# Helpers shared with test_kernels.py


def make_targets(N, V, counts=None, *, seed=0, max_k=11, zero_prob_entry=False, dtype=torch.float32):
    """Random CSR targets: unique ids per row, probabilities summing to 1 (rows with 0 entries
    are "ignored" rows). zero_prob_entry adds a q = 0 entry to the first non-empty row."""
    g = torch.Generator().manual_seed(seed)
    if counts is None:
        counts = torch.randint(0, min(max_k, V) + 1, (N,), generator=g).tolist()
    ids, probs = [], []
    for c in counts:
        ids.append(torch.randperm(V, generator=g)[:c].tolist())
        p = torch.rand(c, generator=g, dtype=torch.float64) + 0.05
        probs.append((p / p.sum()).tolist())
    if zero_prob_entry:
        r = next(i for i, c in enumerate(counts) if c > 0)
        probs[r][0] = 0.0
    t = SparseTargets.from_lists(ids, probs)
    return SparseTargets(t.row_ptr, t.token_ids, t.probs.to(dtype))


def as64(targets):
    return SparseTargets(targets.row_ptr, targets.token_ids, targets.probs.double())


def assert_close(actual, expected, *, rtol, atol, name):
    """allclose with a message giving the max error, where, and both values there."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (actual.sign() == expected.sign())
    bad &= ~both_inf
    if bad.any() or actual.isnan().ne(expected.isnan()).any():
        i = int(torch.argmax(torch.where(bad, err, 0).flatten()))
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        raise AssertionError(f"{name}: {int(bad.sum())} mismatches, max |err| {float(err.nan_to_num().max()):.3g} "
                             f"at {idx}: {float(actual.flatten()[i])} vs {float(expected.flatten()[i])} "
                             f"(rtol {rtol}, atol {atol})")


def max_err(actual, expected):
    return float((actual.detach().double() - expected.detach().double()).abs().max())


def ref_loss_and_grads(tensors, loss_fn, grad_out=None):
    """Float64 leaf copies of `tensors`, the reference loss on them and its gradients."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    loss = loss_fn(*leaves)
    loss.backward(grad_out.double() if grad_out is not None else None)
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


# ------------------------------------------------------------------------------------------------
# Benchmark baselines (benchmarks/kernels.py imports these): code as it is usually written.


def per_position_loop_kl(logits, targets, tau=1.0):
    """One log_softmax + index_select per trained position, then the mean over positions."""
    bounds = targets.row_ptr.tolist()
    total = logits.new_zeros((), dtype=torch.float32)
    for r in range(logits.shape[0]):
        a, b = bounds[r], bounds[r + 1]
        logp = F.log_softmax(logits[r].float() / tau, dim=-1).index_select(0, targets.token_ids[a:b])
        q = targets.probs[a:b].float()
        total = total + (torch.xlogy(q, q) - q * logp).sum()
    return total / logits.shape[0]


def dense_kl(logits, targets, tau=1.0):
    """Dense q [N, V] scattered from the CSR, KL over all V columns, mean over rows."""
    N, V = logits.shape
    rows = torch.repeat_interleave(torch.arange(N, device=logits.device), targets.row_ptr.diff())
    q = torch.zeros(N, V, device=logits.device, dtype=torch.float32)
    q[rows, targets.token_ids] = targets.probs.float()
    logp = F.log_softmax(logits.float() / tau, dim=-1)
    return (torch.xlogy(q, q) - q * logp).sum() / N


def dense_linear_kl(hidden, weight, targets, bias=None, tau=1.0):
    """dense_kl of the materialized logits hidden @ weight^T (+ bias)."""
    logits = F.linear(hidden, weight, bias)
    return dense_kl(logits, targets, tau)


# ------------------------------------------------------------------------------------------------
# The reference and the baselines against independent formulas

def test_reference_matches_dense_formula_and_baselines():
    N, V = 6, 37
    t = make_targets(N, V, [3, 0, 1, 5, 2, 4], seed=1, zero_prob_entry=True)
    z = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    tau = 0.7
    # Independent oracle: explicit double loop over entries, with log-sum-exp by hand.
    expected = []
    for r in range(N):
        a, b = int(t.row_ptr[r]), int(t.row_ptr[r + 1])
        zr = z[r] / tau
        lse = zr.max() + torch.log(torch.exp(zr - zr.max()).sum())
        kl = 0.0
        for j in range(a, b):
            q = float(t.probs[j])
            if q > 0:
                kl += q * (torch.log(torch.tensor(q, dtype=torch.float64)) - (zr[t.token_ids[j]] - lse))
        expected.append(kl)
    expected = torch.tensor([float(e) for e in expected], dtype=torch.float64)
    assert_close(soft_target_kl_ref(z, as64(t), tau=tau, reduction="none"), expected, rtol=1e-12,
                 atol=1e-12, name="ref vs loop")
    assert_close(per_position_loop_kl(z.float(), t, tau), expected.mean(), rtol=1e-5, atol=1e-6, name="loop")
    assert_close(dense_kl(z.float(), t, tau), expected.mean(), rtol=1e-5, atol=1e-6, name="dense")
    h, w = z[:, :5].float(), torch.randn(V, 5, generator=torch.Generator().manual_seed(2))
    assert_close(dense_linear_kl(h, w, t, tau=tau), soft_target_kl_ref((h @ w.T).double(), as64(t), tau=tau),
                 rtol=1e-5, atol=1e-6, name="dense linear")


# ------------------------------------------------------------------------------------------------
# Torch path: values and gradients vs float64

SHAPES = [  # (N, V, counts or None, tau): realistic, prime V, V=1, tiny V, many ignored rows
    (88, 49152, None, 1.0),
    (9, 257, None, 0.7),
    (3, 1, [1, 0, 1], 1.0),
    (5, 13, [13, 0, 0, 4, 1], 2.0),
]


@pytest.mark.parametrize("N,V,counts,tau", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_path_fp32_matches_float64(N, V, counts, tau, reduction):
    t = make_targets(N, V, counts, seed=N + V, zero_prob_entry=True)
    g = torch.Generator().manual_seed(V)
    z = torch.randn(N, V, generator=g) * 4
    w = torch.rand(N, generator=g) + 0.5
    grad_out = torch.randn(N, generator=g) if reduction == "none" else None
    zz = z.clone().requires_grad_()
    loss = soft_target_kl(zz, t, tau=tau, weights=w, reduction=reduction, backend="torch")
    loss.backward(grad_out)
    ref, (gref,) = ref_loss_and_grads(
        [z], lambda x: soft_target_kl_ref(x, as64(t), tau=tau, weights=w.double(), reduction=reduction),
        grad_out)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, rtol=1e-5, atol=1e-6, name="loss")  # fp32
    assert_close(zz.grad, gref, rtol=1e-5, atol=1e-7, name="dlogits")  # fp32


def test_torch_path_bf16_within_twice_torch_error():
    N, V = 16, 1031
    t = make_targets(N, V, seed=3)
    z = (torch.randn(N, V, generator=torch.Generator().manual_seed(3)) * 3).bfloat16()
    ref, (gref,) = ref_loss_and_grads([z], lambda x: soft_target_kl_ref(x, as64(t)))
    zz = z.clone().requires_grad_()
    loss = soft_target_kl(zz, t, backend="torch")
    loss.backward()
    # Torch's own bf16 computation (log_softmax in bf16) sets the scale of acceptable error.
    zt = z.clone().requires_grad_()
    logp = F.log_softmax(zt, dim=-1)
    rows = torch.repeat_interleave(torch.arange(N), t.row_ptr.diff())
    q = t.probs.bfloat16()
    torch_loss = (torch.xlogy(q, q) - q * logp[rows, t.token_ids]).sum() / N
    torch_loss.backward()
    assert zz.grad.dtype == torch.bfloat16
    assert max_err(loss, ref) <= 1e-5 * abs(float(ref)) + 1e-6  # fp32 math on exact bf16 inputs
    assert max_err(zz.grad, gref) <= 2 * max_err(zt.grad, gref) + 1e-6  # bf16 output rounding


def test_gradcheck_float64():
    N, V = 4, 11
    t = as64(make_targets(N, V, [3, 0, 1, 5], seed=4, zero_prob_entry=True))
    z = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    w = torch.rand(N, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: soft_target_kl(x, t, tau=0.6, weights=w, reduction="none", backend="torch"), (z,))
    H = 3
    args = [torch.randn(N, H, dtype=torch.float64, requires_grad=True),
            torch.randn(V, H, dtype=torch.float64, requires_grad=True),
            torch.randn(V, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(
        lambda h, wt, b: linear_soft_target_kl(h, wt, t, bias=b, tau=0.6, weights=w, reduction="none",
                                               backend="torch", chunk_size=3), args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hard_targets_equal_cross_entropy(backend):
    N, V = 10, 97
    g = torch.Generator().manual_seed(5)
    z = torch.randn(N, V, generator=g) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 7]] = -100  # ignored positions: rows without entries
    t = SparseTargets.from_labels(labels)
    zz, zc = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours = soft_target_kl(zz, t, reduction="sum", backend=backend)
    ce = F.cross_entropy(zc, labels, reduction="sum", ignore_index=-100)
    ours.backward()
    ce.backward()
    assert_close(ours, ce, rtol=1e-5, atol=1e-6, name="sum loss vs cross_entropy")
    assert_close(zz.grad, zc.grad, rtol=1e-5, atol=1e-7, name="dlogits vs cross_entropy")
    mean = soft_target_kl(z, t, backend=backend)  # mean over all N rows, ignored ones included
    assert_close(mean * N / 8, F.cross_entropy(z, labels), rtol=1e-5, atol=1e-6, name="mean")


@pytest.mark.parametrize("N,V,H,chunk", [(13, 300, 48, None), (13, 300, 48, 4), (5, 257, 7, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_torch_path_fp32_matches_float64(N, V, H, chunk, with_bias):
    t = make_targets(N, V, seed=N * H, zero_prob_entry=True)
    g = torch.Generator().manual_seed(H)
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) / H**0.5
    b = torch.randn(V, generator=g) if with_bias else None
    weights = torch.rand(N, generator=g)
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    loss = linear_soft_target_kl(leaves[0], leaves[1], t, bias=leaves[2], tau=0.8, weights=weights,
                                 backend="torch", chunk_size=chunk)
    loss.backward()
    ref, grefs = ref_loss_and_grads(
        [h, w, b], lambda hh, ww, bb: linear_soft_target_kl_ref(hh, ww, as64(t), bias=bb, tau=0.8,
                                                                weights=weights.double()))
    assert_close(loss, ref, rtol=1e-5, atol=1e-6, name="loss")
    for name, leaf, gr in zip(("dhidden", "dweight", "dbias"), leaves, grefs):
        if leaf is not None:
            assert_close(leaf.grad, gr, rtol=1e-5, atol=1e-6, name=name)


def test_linear_torch_path_second_backward_recomputes():
    """One chunk keeps exp(z/tau - M) from the forward and consumes it in the backward: a
    second backward (retain_graph) must recompute and give the same gradients."""
    N, V, H = 6, 40, 8
    t = make_targets(N, V, seed=12)
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    loss = linear_soft_target_kl(h, w, t, backend="torch")
    loss.backward(retain_graph=True)
    first = (h.grad.clone(), w.grad.clone())
    h.grad, w.grad = None, None
    loss.backward()
    assert_close(h.grad, first[0], rtol=1e-6, atol=1e-7, name="dhidden, second backward")
    assert_close(w.grad, first[1], rtol=1e-6, atol=1e-7, name="dweight, second backward")


def test_linear_torch_path_frozen_head_and_bf16():
    N, V, H = 12, 211, 32
    t = make_targets(N, V, seed=7)
    g = torch.Generator().manual_seed(7)
    h = torch.randn(N, H, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).bfloat16()  # frozen LM head: no dW
    loss = linear_soft_target_kl(h, w, t, backend="torch")
    loss.backward()
    ref, (gh, _) = ref_loss_and_grads([h, w], lambda hh, ww: linear_soft_target_kl_ref(hh, ww, as64(t)))
    assert w.grad is None and h.grad.dtype == torch.bfloat16
    assert max_err(loss, ref) <= 1e-5 * abs(float(ref)) + 1e-6  # fp32 math on exact bf16 values
    # Torch's own bf16: logits in bf16, then the loss.
    hb = h.detach().clone().requires_grad_()
    dense_linear_kl(hb, w, t).backward()
    assert max_err(h.grad, gh) <= 2 * max_err(hb.grad, gh) + 1e-6


# ------------------------------------------------------------------------------------------------
# Conventions and numerics

def test_empty_rows_and_zero_probabilities():
    V = 8
    t = SparseTargets.from_lists([[], [1, 2], [3]], [[], [1.0, 0.0], [0.0]])
    z = torch.randn(3, V, requires_grad=True)
    kl = soft_target_kl(z, t, reduction="none", backend="torch")
    kl.sum().backward()
    assert float(kl[0].detach()) == 0.0 and float(kl[2].detach()) == 0.0
    assert torch.all(z.grad[0] == 0) and torch.all(z.grad[2] == 0)
    assert_close(kl[1], -F.log_softmax(z.detach()[1].double(), -1)[1], rtol=1e-5, atol=1e-6, name="q=1 row")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adversarial_logits_stay_finite(backend):
    """Logits of +-1e4 (huge exponents) and -inf off the support stay finite and accurate; a
    target on a -inf logit (q > 0) is a genuine +inf loss with a finite gradient."""
    V = 40
    z = torch.randn(4, V, generator=torch.Generator().manual_seed(8))
    z[0, :20], z[0, 20:] = 1e4, -1e4
    z[1, 5:] = float("-inf")
    z[2, :] = float("-inf")
    z[2, 3] = 0.0
    z[3, 7] = float("-inf")
    t = SparseTargets.from_lists([[0, 25], [1, 3], [3, 9], [7, 8]],
                                 [[0.6, 0.4], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    zz = z.clone().requires_grad_()
    kl = soft_target_kl(zz, t, tau=0.5, reduction="none", backend=backend)
    kl[:3].sum().backward()
    ref, (gref,) = ref_loss_and_grads([z], lambda x: soft_target_kl_ref(x[:3], as64(t_head(t, 3)), tau=0.5,
                                                                        reduction="sum"))
    assert torch.isfinite(kl[:3]).all() and torch.isfinite(zz.grad).all()
    assert_close(kl[:3], soft_target_kl_ref(z[:3].double(), as64(t_head(t, 3)), tau=0.5, reduction="none"),
                 rtol=1e-5, atol=1e-4, name="loss (|z| = 1e4: fp32 ulp is 1e-3)")
    assert_close(zz.grad[:3], gref[:3], rtol=1e-5, atol=1e-6, name="dlogits")
    assert float(kl[3].detach()) == float("inf")
    z3 = z[3:].clone().requires_grad_()
    soft_target_kl(z3, t_tail(t, 3), reduction="sum", backend=backend).backward()
    expected = torch.softmax(z[3], -1) - torch.zeros(V).index_fill(0, torch.tensor([7, 8]), 0.5)
    assert_close(z3.grad[0], expected, rtol=1e-5, atol=1e-7, name="finite gradient at +inf loss")


def t_head(t, n):
    """The first n rows of CSR targets."""
    end = int(t.row_ptr[n])
    return SparseTargets(t.row_ptr[: n + 1], t.token_ids[:end], t.probs[:end])


def t_tail(t, n):
    """The rows from n on of CSR targets."""
    start = int(t.row_ptr[n])
    return SparseTargets(t.row_ptr[n:] - start, t.token_ids[start:], t.probs[start:])


def test_inplace_grad_overwrites_logits():
    N, V = 5, 30
    t = make_targets(N, V, seed=9)
    z = torch.randn(N, V)
    leaf = z.clone().requires_grad_()
    (expected,) = torch.autograd.grad(soft_target_kl(leaf, t, backend="torch"), leaf)
    base = z.clone().requires_grad_()
    logits = base * 1.0  # non-leaf, as an LM head output would be
    soft_target_kl(logits, t, backend="torch", inplace_grad=True).backward()
    assert_close(logits.detach(), expected, rtol=0, atol=0, name="logits now hold the gradient")
    assert_close(base.grad, expected, rtol=0, atol=0, name="gradient")


# ------------------------------------------------------------------------------------------------
# Validation: every error names what is wrong

def _base():
    return torch.randn(3, 10), SparseTargets.from_lists([[1, 2], [], [3]], [[0.5, 0.5], [], [1.0]])


def _targets(row_ptr, ids, probs):
    return SparseTargets(torch.tensor(row_ptr), torch.tensor(ids), torch.tensor(probs))


@pytest.mark.parametrize("targets,match", [
    (_targets([0, 2, 2], [1, 2], [0.5, 0.5]), "targets have 2 rows"),
    (_targets([1, 2, 2, 3], [1, 2, 3], [0.5, 0.5, 1.0]), r"row_ptr\[0\] must be 0"),
    (_targets([0, 2, 1, 3], [1, 2, 3], [0.5, 0.5, 1.0]), "not monotone at row 1"),
    (_targets([0, 2, 2, 2], [1, 2, 3], [0.5, 0.5, 1.0]), r"row_ptr\[N\]=2 does not match the 3 entries"),
    (_targets([0, 2, 2, 3], [1, 2, 10], [0.5, 0.5, 1.0]), r"row 2: token id 10 \(entry 2\) is outside \[0, 10\)"),
    (_targets([0, 2, 2, 3], [1, -1, 3], [0.5, 0.5, 1.0]), "row 0: token id -1"),
    (_targets([0, 2, 2, 3], [1, 2, 3], [0.5, -0.5, 1.0]), "row 0: target probability -0.5"),
    (_targets([0, 2, 2, 3], [1, 2, 3], [0.5, 0.5, float("nan")]), "row 2: target probability nan"),
    (_targets([0, 2, 2, 3], [1, 2, 3], [0.5, 0.5, float("inf")]), "row 2: target probability inf"),
    (_targets([0, 2, 2, 3], [4, 4, 3], [0.5, 0.5, 1.0]), "row 0: token id 4 appears more than once"),
])
@pytest.mark.parametrize("linear", [False, True])
def test_bad_targets_raise(targets, match, linear):
    z, _ = _base()
    with pytest.raises(ValueError, match=match):
        if linear:
            linear_soft_target_kl(z, torch.randn(10, 10), targets)
        else:
            soft_target_kl(z, targets)


def test_bad_arguments_raise():
    z, t = _base()
    cases = [
        (lambda: soft_target_kl(z[0], t), "logits must be a floating tensor of shape"),
        (lambda: soft_target_kl(z, t, tau=0.0), "tau must be a positive finite number"),
        (lambda: soft_target_kl(z, t, tau=float("inf")), "tau must be a positive finite number"),
        (lambda: soft_target_kl(z, t, weights=torch.ones(4)), r"weights must be a tensor of shape \(3,\)"),
        (lambda: soft_target_kl(z, t, weights=torch.tensor([1.0, float("nan"), 1.0])), "row 1: weight nan"),
        (lambda: soft_target_kl(z, t, reduction="avg"), "reduction must be one of"),
        (lambda: soft_target_kl(z, t, backend="cuda"), "backend must be one of"),
        (lambda: soft_target_kl(z, (t.row_ptr, t.token_ids, t.probs)), "must be a calft.losses.SparseTargets"),
        (lambda: SparseTargets(t.row_ptr.int(), t.token_ids, t.probs), "row_ptr must be int64"),
        (lambda: SparseTargets(t.row_ptr, t.token_ids, t.probs[:2]), "3 token ids but 2 probabilities"),
        (lambda: SparseTargets(t.row_ptr, t.token_ids, t.token_ids), "probs must be floating point"),
        (lambda: SparseTargets.from_lists([[1, 2]], [[1.0]]), "row 0: 2 token ids but 1 probabilities"),
        (lambda: linear_soft_target_kl(z, torch.randn(10, 9), t), r"expected \[V, 10\]"),
        (lambda: linear_soft_target_kl(z, torch.randn(10, 10).double(), t), "lm_weight is torch.float64"),
        (lambda: linear_soft_target_kl(z, torch.randn(10, 10), t, bias=torch.randn(9)), "bias has 9 entries"),
        (lambda: linear_soft_target_kl(z[0], torch.randn(10, 10), t), "hidden must be a 2-D floating tensor"),
        (lambda: soft_target_kl(z.long(), t), "logits must be a floating tensor"),
        (lambda: soft_target_kl(z, t, weights=torch.ones(3, dtype=torch.long)), "weights must be a floating tensor"),
        (lambda: SparseTargets(t.row_ptr[None], t.token_ids, t.probs), "row_ptr must be a 1-D tensor"),
        (lambda: SparseTargets(t.row_ptr[:0], t.token_ids[:0], t.probs[:0]), "needs N\\+1 >= 1 entries"),
        (lambda: soft_target_kl(z.double(), t, backend="triton"), "the Triton kernels read"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


def test_validate_false_skips_value_checks_and_triton_needs_a_device(monkeypatch):
    z, _ = _base()
    bad = _targets([0, 2, 2, 3], [1, 2, 3], [0.5, 0.5, float("nan")])
    assert torch.isnan(soft_target_kl(z, bad, validate=False))  # computed, not checked
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        soft_target_kl(z, _base()[1], backend="triton")


def test_torch_compile_fullgraph_no_host_sync():
    """validate=False must trace without graph breaks (a .item() would break fullgraph)."""
    N, V, H = 6, 50, 8
    t = make_targets(N, V, seed=11)
    z, h, w = torch.randn(N, V), torch.randn(N, H), torch.randn(V, H)

    def step(z, h, w):
        a = soft_target_kl(z, t, tau=0.9, backend="torch", validate=False)
        b = linear_soft_target_kl(h, w, t, backend="torch", validate=False, chunk_size=4)
        return a + b + linear_soft_target_kl(h, w, t, backend="torch", validate=False)  # 1 chunk

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (z, h, w)]
    out = compiled(*leaves)
    out.backward()
    eager = [x.clone().requires_grad_() for x in (z, h, w)]
    step(*eager).backward()
    assert_close(out, step(z, h, w), rtol=1e-6, atol=1e-6, name="compiled loss")
    for a, b in zip(leaves, eager):
        assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, name="compiled grad")
