"""Fused basis cross-entropy against F.cross_entropy on the decoded logits (float64), for both implementations.

impl="torch" is the PyTorch reference; impl="triton" runs the Triton kernels, on CPU through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) or on a GPU with HF_BASIS_TEST_DEVICE=cuda. Shapes are tiny
and odd (the interpreter runs every program in Python).
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from hf_basis.ops.basis_cross_entropy import basis_cross_entropy
from hf_basis.ops.basis_linear import basis_linear

from kernel_device import DEVICE, require_device

require_device()

try:
    import triton  # noqa: F401

    HAVE_TRITON = DEVICE != "cpu" or os.environ.get("TRITON_INTERPRET") == "1"
except ImportError:
    HAVE_TRITON = False

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton (GPU or "
                                                                                            "TRITON_INTERPRET=1)"))]
# (label_smoothing, z_loss, softcap, bias)
OPTIONS = [(0.0, 0.0, None, True), (0.1, 0.0, None, False), (0.0, 1e-2, None, True), (0.15, 5e-3, 2.5, True)]


def _problem(T=37, V=53, B=3, K=5, d=4, dtype=torch.float32, bias=True, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B * d, generator=g).to(DEVICE, dtype)
    C = torch.randn(B, K, d, generator=g).to(DEVICE, dtype)
    codes = torch.randint(0, K, (V, B), generator=g, dtype=torch.int64).to(DEVICE, torch.uint8)
    b = torch.randn(V, generator=g).to(DEVICE, dtype) if bias else None
    y = torch.randint(0, V, (T,), generator=g).to(DEVICE)
    if ignore_every:
        y[::ignore_every] = -100
    return x, C, codes, b, y


def _dense_loss(x, C, codes, b, y, reduction, eps, z, cap, ignore_index=-100):
    """F.cross_entropy on the decoded logits, plus z * lse^2 per non-ignored token (the documented definition)."""
    logits = basis_linear(x, C, codes, b)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    ce = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none", label_smoothing=eps)
    valid = y != ignore_index
    per_token = ce + z * torch.logsumexp(logits, dim=1) ** 2 * valid
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum()


def _grads(fn, tensors, weight):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * weight).sum(), [t for t in leaves if t is not None])
    return out.detach(), grads


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(impl, reduction, eps, z, cap, bias, dtype=torch.float32, tol=1e-5, chunk=None, train_bias=True, **shape):
    x, C, codes, b, y = _problem(dtype=dtype, bias=bias, **shape)
    # upstream gradient: per token for "none", a scalar != 1 otherwise (the backward must scale by it)
    weight = torch.randn(y.shape, device=DEVICE, dtype=torch.float64) if reduction == "none" else 0.37
    frozen = None if train_bias or b is None else b  # a bias that needs no gradient: a constant of both sides
    ref, ref_g = _grads(lambda x_, C_, b_: _dense_loss(x_, C_, codes, b_ if frozen is None else frozen.double(), y,
                                                       reduction, eps, z, cap),
                        [t.double() if t is not None else None for t in (x, C, b if frozen is None else None)], weight)
    out, g = _grads(lambda x_, C_, b_: basis_cross_entropy(x_, C_, codes, b_ if frozen is None else frozen, y,
                                                           reduction=reduction, label_smoothing=eps, z_loss=z,
                                                           softcap=cap, impl=impl, chunk_tokens=chunk),
                    [x, C, b if frozen is None else None], weight)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel(out, ref) < tol, (out, ref)
    for name, a, r in zip(["hidden", "centroids", "bias"], g, ref_g):
        assert a.dtype == dtype, name
        assert _rel(a, r) < tol * 10, (name, _rel(a, r))  # gradients: sums of many terms


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps,z,cap,bias", OPTIONS)
def test_matches_cross_entropy_fp32(impl, reduction, eps, z, cap, bias):
    _check(impl, reduction, eps, z, cap, bias, chunk=10)  # several token chunks, the last one partial


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16(impl):
    # bf16 inputs: the reference runs in float64 on the same (rounded) values; our logits accumulate in fp32 and the
    # logit gradient is stored in bf16 before the scatter.
    _check(impl, "mean", 0.1, 1e-3, None, True, dtype=torch.bfloat16, tol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16(impl):
    # fp16 keeps the gradient passes in the backward, so that the upstream gradient scales before the rounding
    _check(impl, "mean", 0.1, 1e-3, None, True, dtype=torch.float16, tol=1e-2)


def _count_gradient_passes(monkeypatch):
    """Counts calls of the gradient pass (the reference's ce_grad_reference) through the module's `_kernels`."""
    ce = importlib.import_module("hf_basis.ops.basis_cross_entropy")  # the package exports the function by this name

    calls = []
    original = ce._kernels

    def counting(impl):
        forward_fn, grad_fn = original(impl)
        return forward_fn, lambda *a, **k: (calls.append(1), grad_fn(*a, **k))[1]

    monkeypatch.setattr(ce, "_kernels", counting)
    return calls


@pytest.mark.parametrize(
    "dtype,reduction,in_forward",
    [(torch.float32, "mean", True), (torch.bfloat16, "sum", True), (torch.float16, "mean", False),
     (torch.float32, "none", False)],
)
def test_gradient_pass_runs_once_where_documented(monkeypatch, dtype, reduction, in_forward):
    """A scalar bf16/fp32 loss computes its gradients in the forward; fp16 and "none" in the backward; never twice,
    never under no_grad; a second backward (retain_graph) accumulates the same gradients again."""
    calls = _count_gradient_passes(monkeypatch)
    x, C, codes, b, y = _problem(T=12, V=20, dtype=dtype)
    with torch.no_grad():
        basis_cross_entropy(x, C, codes, b, y, reduction=reduction, impl="torch")
    assert calls == []
    xl = x.clone().requires_grad_()
    loss = basis_cross_entropy(xl, C, codes, b, y, reduction=reduction, impl="torch")
    assert len(calls) == (1 if in_forward else 0)
    loss.sum().backward(retain_graph=True)
    assert len(calls) == 1
    first = xl.grad.clone()
    loss.sum().backward()
    assert len(calls) == (1 if in_forward else 2)
    torch.testing.assert_close(xl.grad, 2 * first)


@pytest.mark.parametrize("impl", IMPLS)
def test_default_chunking_and_odd_sizes(impl):
    _check(impl, "mean", 0.0, 0.0, None, True, T=70, V=131, B=2, K=7, d=3)  # default chunk size
    _check(impl, "sum", 0.05, 0.0, None, False, T=1, V=5, B=1, K=2, d=1, ignore_every=0)


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
def test_triton_stages_against_reference():
    """Each Triton stage against its PyTorch twin: lse over several vocabulary splits, the finalize (bad labels too),
    and the gradient with chunks of 64 tokens (the rounding step), per-token and scalar upstream gradients."""
    from hf_basis.ops.basis_cross_entropy import ce_grad_reference, forward_stats_reference, lse_reference
    from hf_basis.ops.basis_cross_entropy_triton import ce_grad_triton, forward_stats_triton, lse_triton
    from hf_basis.ops.basis_linear import centroid_scores

    x, C, codes, b, y = _problem(T=70, V=97, bias=True)
    y[3] = 97  # out of range: flagged, not counted
    P = centroid_scores(x, C).contiguous()
    cfg = {"BLOCK_T": 16, "BLOCK_V": 16, "splits": 3, "num_warps": 4, "num_stages": 1}
    lse, tot = lse_triton(P, codes, b, softcap=3.0, with_sum=True, config=cfg)
    lse_r, tot_r = lse_reference(P, codes, b, softcap=3.0, with_sum=True)
    assert _rel(lse, lse_r) < 1e-6 and _rel(tot, tot_r) < 1e-5
    args = (P, codes, b, y, -100, 0.1, 1e-3, 3.0)
    stats, out = forward_stats_triton(*args, config=cfg)
    stats_r, out_r = forward_stats_reference(*args)
    assert _rel(stats, stats_r) < 1e-6 and _rel(out, out_r) < 1e-6
    assert out[2, 3] == 1 and out[1, 3] == 0 and out[1].sum() == 70 - 14 - 1
    for scale in (torch.rand(70, device=DEVICE), torch.tensor([0.3], device=DEVICE)):
        gP_r, gb_r = ce_grad_reference(P, codes, b, stats_r, y, scale, softcap=3.0)
        for block_t in (16, 32):
            cfg_g = {"grad": {"BLOCK_T": block_t, "BLOCK_V": 16, "num_warps": 4, "num_stages": 1}}
            gP, gb = ce_grad_triton(P, codes, b, stats_r, y, scale, softcap=3.0, chunk=64, config=cfg_g)
            assert gP.shape == gP_r.shape and _rel(gP, gP_r) < 1e-5 and _rel(gb, gb_r) < 1e-5


def _count_forward_paths(monkeypatch, min_logits=0):
    """Counts the Triton forwards the autograd Function runs: the one-pass and the two-pass (log-sum-exp) one.
    The one-pass path is taken from `min_logits` logits per call (the tests' problems are tiny)."""
    import hf_basis.ops.basis_cross_entropy_triton as K

    monkeypatch.setattr(K, "ONE_PASS_MIN_LOGITS", min_logits)
    calls = []
    for name in ("forward_stats_one_pass_triton", "forward_stats_triton"):
        original = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    return calls


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("eps,z,cap,bias", [(0.0, 0.0, None, False), (0.1, 0.0, None, True), (0.0, 1e-2, 2.5, True),
                                            (0.15, 5e-3, 2.5, False)])
def test_one_pass_forward_with_gradients(monkeypatch, reduction, eps, z, cap, bias):
    """A scalar loss whose bias needs no gradient takes one gather pass for loss and gradients (label smoothing with
    soft-capping excepted: two passes); both match F.cross_entropy, over several chunks, fp32 and bf16."""
    calls = _count_forward_paths(monkeypatch)
    _check("triton", reduction, eps, z, cap, bias, chunk=10, train_bias=False)
    _check("triton", reduction, eps, z, cap, bias, dtype=torch.bfloat16, tol=1e-2, train_bias=False)
    one_pass = not (eps and cap)
    assert calls == ["forward_stats_one_pass_triton"] * 2 if one_pass else calls == ["forward_stats_triton"] * 2


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
def test_one_pass_only_from_min_logits(monkeypatch):
    """Below ONE_PASS_MIN_LOGITS (T x V) a call keeps the two passes (no host sync); from it on, one pass."""
    x, C, codes, _, y = _problem(T=10, V=30)
    for min_logits, path in ((301, "forward_stats_triton"), (300, "forward_stats_one_pass_triton")):
        calls = _count_forward_paths(monkeypatch, min_logits)
        basis_cross_entropy(x.clone().requires_grad_(), C, codes, None, y, impl="triton").backward()
        assert calls == [path]


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
@pytest.mark.parametrize("eps,cap", [(0.1, None), (0.0, 3.0)])
def test_one_pass_stages_against_reference(eps, cap):
    """The one-pass forward's stats against the PyTorch forward (bad labels too), and grad_from_sums against the
    reference gradient for per-token and scalar upstream gradients, with several 64-token chunks."""
    from hf_basis.ops.basis_cross_entropy import ce_grad_reference, forward_stats_reference
    from hf_basis.ops.basis_cross_entropy_triton import ExpSums, forward_stats_one_pass_triton, grad_from_sums_triton
    from hf_basis.ops.basis_linear import centroid_scores

    x, C, codes, b, y = _problem(T=150, V=97, bias=True)
    y[3] = 97  # out of range: flagged, not counted
    P = centroid_scores(x, C).contiguous()
    args = (P, codes, b, y, -100, eps, 1e-3, cap)
    cfg = {"exp": {"BLOCK_T": 16, "BLOCK_V": 16, "splits": 3, "num_warps": 4, "num_stages": 1}}
    stats, out, sums = forward_stats_one_pass_triton(*args, chunk=64, config=cfg)
    stats_r, out_r = forward_stats_reference(*args)
    assert _rel(stats, stats_r) < 1e-6 and _rel(out, out_r) < 1e-6
    assert out[2, 3] == 1 and out[1, 3] == 0
    for scale in (torch.rand(150, device=DEVICE), torch.tensor([0.3], device=DEVICE)):
        gP = grad_from_sums_triton(ExpSums(sums.sums.clone(), sums.shift, sums.ycoef), codes, y, stats, scale)
        gP_r, _ = ce_grad_reference(P, codes, b, stats_r, y, scale, softcap=cap, need_bias_grad=False)
        assert gP.shape == gP_r.shape and _rel(gP, gP_r) < 1e-5


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter (numpy) warns of the overflow itself
def test_one_pass_shift_overflow_recomputes(monkeypatch):
    """A logit ~100 nats above every sampled word overflows the one-pass sums: detected, recomputed in two passes."""
    import hf_basis.ops.basis_cross_entropy_triton as K

    monkeypatch.setattr(K, "_SHIFT_SAMPLE_WORDS", 1)  # the shift then comes from word 0 alone
    x, C, codes, _, y = _problem(T=20, V=40, ignore_every=0)
    x = x * 12.0
    logits = basis_linear(x.double(), C.double(), codes)
    assert ((logits.max(dim=1).values - logits[:, 0]) > 130).any()  # the premise: exp(l - shift) overflows
    calls = _count_forward_paths(monkeypatch)
    ref, ref_g = _grads(lambda x_, C_: _dense_loss(x_, C_, codes, None, y, "mean", 0.0, 0.0, None),
                        [x.double(), C.double()], 1.0)
    out, g = _grads(lambda x_, C_: basis_cross_entropy(x_, C_, codes, None, y, impl="triton"), [x, C], 1.0)
    assert calls == ["forward_stats_one_pass_triton", "forward_stats_triton"]
    assert torch.isfinite(out) and _rel(out, ref) < 1e-5
    assert all(_rel(a, r) < 1e-4 for a, r in zip(g, ref_g))


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
@pytest.mark.parametrize("bias", [True, False])  # a trained bias takes the two-pass path, none the one-pass path
def test_triton_backward_is_deterministic(bias):
    x, C, codes, b, y = _problem(T=45, V=60, bias=bias)
    runs = [_grads(lambda x_, C_, b_: basis_cross_entropy(x_, C_, codes, b_, y, impl="triton", chunk_tokens=16),
                   [x, C, b], 1.0)[1] for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_and_shapes(impl):
    x, C, codes, b, y = _problem(T=6, V=11)
    y[:] = -7
    x3, y2 = x.view(2, 3, -1), y.view(2, 3)
    mean = basis_cross_entropy(x3, C, codes, b, y2, ignore_index=-7, impl=impl)
    assert torch.isnan(mean)  # 0 / 0, as F.cross_entropy
    total = basis_cross_entropy(x3, C, codes, b, y2, ignore_index=-7, reduction="sum", impl=impl)
    assert total.item() == 0.0
    per_token = basis_cross_entropy(x3, C, codes, b, y2, ignore_index=-7, reduction="none", impl=impl)
    assert per_token.shape == (2, 3) and not per_token.any()
    xl = x3.detach().requires_grad_()
    basis_cross_entropy(xl, C, codes, b, y2, ignore_index=-7, reduction="sum", impl=impl).backward()
    assert not xl.grad.any()


def test_mixed_dtypes_and_frozen_inputs():
    """fp32 centroids under bf16 hidden (cast inside, differentiably); no bias; only the centroids need grad."""
    x, C, codes, _, y = _problem(dtype=torch.float32, bias=False)
    Cl = C.clone().requires_grad_()
    loss = basis_cross_entropy(x.bfloat16(), Cl, codes, None, y, impl="torch")
    loss.backward()
    assert Cl.grad is not None and Cl.grad.dtype == torch.float32
    ref = _dense_loss(x.bfloat16().double(), C.bfloat16().double(), codes, None, y, "mean", 0.0, 0.0, None)
    assert _rel(loss.detach(), ref) < 1e-2


def test_argument_errors():
    x, C, codes, b, y = _problem(T=4, V=9)
    with pytest.raises(ValueError, match="reduction"):
        basis_cross_entropy(x, C, codes, b, y, reduction="avg")
    with pytest.raises(ValueError, match="labels"):
        basis_cross_entropy(x, C, codes, b, y[:3])
    with pytest.raises(ValueError, match="features"):
        basis_cross_entropy(x[:, :-1], C, codes, b, y)
    with pytest.raises(ValueError, match="label_smoothing"):
        basis_cross_entropy(x, C, codes, b, y, label_smoothing=1.5)
    if DEVICE == "cpu":
        bad = y.clone()
        bad[1] = 9
        for impl in ["torch"] + (["triton"] if HAVE_TRITON else []):
            with pytest.raises(RuntimeError, match="out of range"):
                basis_cross_entropy(x, C, codes, b, bad, impl=impl)
