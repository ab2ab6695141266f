"""Triton basis-decode kernels against the PyTorch reference, and the autograd Function against a dense F.linear.

Runs the Triton kernels on CPU through Triton's interpreter by default (CI has no GPU); set
HF_BASIS_TEST_DEVICE=cuda to run the same tests on a GPU for real. Shapes are small: the interpreter runs every
program in Python.
"""

import pytest
import torch
import torch.nn.functional as F

from kernel_device import DEVICE, require_device

triton = pytest.importorskip("triton")
require_device()

import hf_basis.ops.basis_decode_triton as kernels  # noqa: E402
from hf_basis.ops import basis_decode as decode_mod  # noqa: E402
from hf_basis.ops.basis_decode import (  # noqa: E402
    basis_decode,
    basis_decode_backward_reference,
    basis_decode_reference,
)

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def onehot_backward(grad, codes, K):
    """Independent oracle (no CSR): grad_P[b] = onehot(codes[:, b])^T @ grad^T in float64 -> (B, K, T)."""
    onehot = F.one_hot(codes.cpu().long(), K).double()  # (V, B, K)
    return torch.einsum("vbk,tv->bkt", onehot, grad.cpu().double()).float()


def _assert_backward_matches_reference(grad, codes, K):
    """The Triton decode backward (with the bias gradient) against the PyTorch reference, in fp32 tolerances."""
    grad_P, grad_bias = kernels.basis_decode_backward_triton(grad, codes, K, True)
    ref_P, ref_bias = basis_decode_backward_reference(grad.cpu(), codes.cpu(), K, True)
    torch.testing.assert_close(grad_P.cpu(), ref_P, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_bias.cpu(), ref_bias, rtol=1e-5, atol=1e-5)


def make_inputs(B, K, T, V, codes_dtype=torch.uint8, dtype=torch.float32, with_bias=True, seed=0):
    g = _gen(seed)
    P = torch.randn(B, K, T, generator=g).to(dtype).to(DEVICE)
    codes = torch.randint(0, K, (V, B), generator=g).to(codes_dtype).to(DEVICE)
    bias = torch.randn(V, generator=g).to(dtype).to(DEVICE) if with_bias else None
    return P, codes, bias


# (B, K, T, V, codes dtype): num_basis 1 and 16, K = 3 / 256 (uint8) / 300 / 1000 (int16), T = 1 and odd, V odd;
# T = 70: the 64-token tiles of the default config, the second one partial.
FORWARD_SHAPES = [
    (1, 3, 1, 50, torch.uint8),
    (2, 300, 70, 1007, torch.int16),
    (8, 256, 37, 1007, torch.uint8),
    (16, 3, 16, 129, torch.uint8),
    (2, 300, 5, 1007, torch.int16),
    (1, 1000, 3, 257, torch.int16),
]
# Backward launches one program per (b, k, token tile): keep B*K small for the interpreter.
BACKWARD_SHAPES = [
    (1, 3, 1, 50, torch.uint8),
    (2, 256, 37, 1007, torch.uint8),
    (16, 3, 20, 129, torch.uint8),
    (1, 300, 7, 1007, torch.int16),
]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,K,T,V,codes_dtype", FORWARD_SHAPES)
def test_forward_matches_reference(B, K, T, V, codes_dtype, dtype, with_bias):
    P, codes, bias = make_inputs(B, K, T, V, codes_dtype, dtype, with_bias, seed=B * 1000 + T)
    out = kernels.basis_decode_triton(P, codes, bias)
    ref = basis_decode_reference(P.cpu(), codes.cpu(), None if bias is None else bias.cpu())
    assert out.shape == (T, V) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])


@pytest.mark.parametrize("need_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,K,T,V,codes_dtype", BACKWARD_SHAPES)
def test_backward_matches_reference(B, K, T, V, codes_dtype, dtype, need_bias):
    _, codes, _ = make_inputs(B, K, T, V, codes_dtype, seed=V + T)
    grad = torch.randn(T, V, generator=_gen(T)).to(dtype).to(DEVICE)
    grad_P, grad_bias = kernels.basis_decode_backward_triton(grad, codes, K, need_bias)
    ref_P, ref_bias = basis_decode_backward_reference(grad.cpu(), codes.cpu(), K, need_bias)
    torch.testing.assert_close(ref_P, onehot_backward(grad, codes, K), rtol=1e-5, atol=1e-5)  # the oracle itself
    assert grad_P.shape == (B, K, T) and grad_P.dtype == torch.float32
    # Inputs are exact in fp32 either way; only the summation order differs.
    torch.testing.assert_close(grad_P.cpu(), ref_P, rtol=1e-5, atol=1e-5)
    if need_bias:
        torch.testing.assert_close(grad_bias.cpu(), ref_bias, rtol=1e-5, atol=1e-5)
    else:
        assert grad_bias is None


def test_backward_stores_requested_dtypes():
    _, codes, _ = make_inputs(4, 5, 9, 77, seed=3)
    grad = torch.randn(9, 77, generator=_gen(4)).half().to(DEVICE)
    grad_P, grad_bias = kernels.basis_decode_backward_triton(
        grad, codes, 5, True, grad_dtype=torch.float16, bias_grad_dtype=torch.bfloat16
    )
    ref_P, ref_bias = basis_decode_backward_reference(grad.cpu(), codes.cpu(), 5, True)
    assert grad_P.dtype == torch.float16 and grad_bias.dtype == torch.bfloat16
    torch.testing.assert_close(grad_P.cpu(), ref_P.half(), **TOL[torch.float16])
    torch.testing.assert_close(grad_bias.cpu(), ref_bias.bfloat16(), **TOL[torch.bfloat16])


def test_non_contiguous_inputs():
    B, K, T, V = 3, 7, 11, 203
    g = _gen(5)
    P_btk = torch.randn(B, T, K, generator=g).to(DEVICE)
    P = P_btk.transpose(1, 2)  # (B, K, T) with token stride K
    codes_wide = torch.randint(0, K, (V, 2 * B), generator=g).to(torch.uint8).to(DEVICE)
    codes = codes_wide[:, ::2]  # column stride 2
    bias = torch.randn(2 * V, generator=g).to(DEVICE)[::2]
    assert not P.is_contiguous() and not codes.is_contiguous() and not bias.is_contiguous()
    out = kernels.basis_decode_triton(P, codes, bias)
    ref = basis_decode_reference(P.cpu(), codes.cpu(), bias.cpu())
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])

    grad_vt = torch.randn(V, 2 * T, generator=g).to(DEVICE)
    grad = grad_vt[:, ::2].t()  # (T, V), strides (2, 2T)
    assert not grad.is_contiguous()
    _assert_backward_matches_reference(grad, codes, K)


def test_repeated_launches_match_reference():
    """Launches after the first reuse the cached compiled kernel: fresh data and new buffers each time."""
    B, K, T, V = 4, 19, 24, 515
    for seed in range(3):
        P, codes, bias = make_inputs(B, K, T, V, dtype=torch.float16, seed=100 + seed)
        grad = torch.randn(T, V, generator=_gen(200 + seed)).half().to(DEVICE)
        out = kernels.basis_decode_triton(P, codes, bias)
        ref = basis_decode_reference(P.cpu(), codes.cpu(), bias.cpu())
        torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float16])
        _assert_backward_matches_reference(grad, codes, K)


def test_skewed_codes_and_empty_clusters():
    """Real codebooks are skewed: one huge cluster, many empty ones."""
    B, K, T, V = 2, 40, 9, 600
    codes = torch.zeros(V, B, dtype=torch.uint8)
    codes[::7, 0] = 3
    codes[::5, 1] = torch.randint(0, 4, (len(range(0, V, 5)),), generator=_gen(6)).to(torch.uint8)
    codes = codes.to(DEVICE)
    grad = torch.randn(T, V, generator=_gen(7)).to(DEVICE)
    _assert_backward_matches_reference(grad, codes, K)


def test_csr_cache_follows_in_place_edits():
    B, K, T, V = 2, 5, 4, 97
    _, codes, _ = make_inputs(B, K, T, V, seed=8)
    grad = torch.randn(T, V, generator=_gen(9)).to(DEVICE)
    first, _ = kernels.basis_decode_backward_triton(grad, codes, K, False)
    assert decode_mod.codes_csr(codes, K) is decode_mod.codes_csr(codes, K)  # cached
    codes.copy_(torch.randint(0, K, (V, B), generator=_gen(10)).to(codes.dtype))  # bumps codes._version
    second, _ = kernels.basis_decode_backward_triton(grad, codes, K, False)
    torch.testing.assert_close(second.cpu(), onehot_backward(grad, codes, K), rtol=1e-5, atol=1e-5)
    ref, _ = basis_decode_backward_reference(codes=codes, grad_logits=grad, num_clusters=K, need_bias_grad=False)
    torch.testing.assert_close(ref.cpu(), onehot_backward(grad, codes, K), rtol=1e-5, atol=1e-5)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_mode_bit_identical(dtype):
    B, K, T, V = 4, 16, 21, 777
    P, codes, bias = make_inputs(B, K, T, V, dtype=dtype, seed=11)
    grad = torch.randn(T, V, generator=_gen(12)).to(dtype).to(DEVICE)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            decode_mod._CSR_CACHE.clear()  # rebuild the CSR too: its sort must be deterministic as well
            out = kernels.basis_decode_triton(P, codes, bias)
            grad_P, grad_bias = kernels.basis_decode_backward_triton(grad, codes, K, True)
            runs.append((out, grad_P, grad_bias))
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _dense_weight(centroids, codes):
    """W[w] = concat_b centroids[b, codes[w, b]]: (V, B*d)."""
    B = centroids.shape[0]
    return torch.cat([centroids[b][codes[:, b].long()] for b in range(B)], dim=1)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("B,K,T,V", [(4, 6, 13, 301), (1, 3, 1, 40), (16, 3, 5, 99)])
def test_autograd_matches_dense_linear(monkeypatch, B, K, T, V, with_bias):
    monkeypatch.setattr(decode_mod, "use_triton", lambda *tensors: True)  # route CPU tensors to the kernels too
    d = 3
    g = _gen(V)
    x = torch.randn(T, B * d, generator=g).to(DEVICE).requires_grad_()
    C = torch.randn(B, K, d, generator=g).to(DEVICE).requires_grad_()
    codes = torch.randint(0, K, (V, B), generator=g).to(torch.uint8).to(DEVICE)
    bias = torch.randn(V, generator=g).to(DEVICE).requires_grad_() if with_bias else None
    grad_out = torch.randn(T, V, generator=g).to(DEVICE)

    P = torch.bmm(C, x.view(T, B, d).permute(1, 2, 0))  # (B, K, T)
    logits = basis_decode(P, codes, bias)
    leaves = [x, C] + ([bias] if with_bias else [])
    grads = torch.autograd.grad(logits, leaves, grad_out)

    xr, Cr = x.detach().clone().requires_grad_(), C.detach().clone().requires_grad_()
    br = bias.detach().clone().requires_grad_() if with_bias else None
    dense = F.linear(xr, _dense_weight(Cr, codes), br)
    ref_grads = torch.autograd.grad(dense, [xr, Cr] + ([br] if with_bias else []), grad_out)

    torch.testing.assert_close(logits, dense, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_autograd_half_precision_grads_keep_dtypes(monkeypatch):
    monkeypatch.setattr(decode_mod, "use_triton", lambda *tensors: True)
    P, codes, bias = make_inputs(3, 9, 8, 150, dtype=torch.float16, seed=13)
    P.requires_grad_()
    bias.requires_grad_()
    grad_out = torch.randn(8, 150, generator=_gen(14)).half().to(DEVICE)
    basis_decode(P, codes, bias).backward(grad_out)
    ref_P, ref_bias = basis_decode_backward_reference(grad_out.cpu(), codes.cpu(), 9, True)
    assert P.grad.dtype == torch.float16 and bias.grad.dtype == torch.float16
    torch.testing.assert_close(P.grad.cpu(), ref_P.half(), **TOL[torch.float16])
    torch.testing.assert_close(bias.grad.cpu(), ref_bias.half(), **TOL[torch.float16])
