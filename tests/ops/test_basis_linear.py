"""The centroid projection's hand-written backward against autograd through the plain bmm; basis_linear (one op:
projection + decode) against the dense layer built from the same codebook."""

import pytest
import torch

from hf_basis.ops.basis_linear import basis_linear, centroid_scores


def test_centroid_scores_gradcheck():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    C = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(centroid_scores, (x, C))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_centroid_scores_matches_plain_bmm(dtype, tol):
    T, B, K, d = 9, 4, 7, 5
    x = torch.randn(T, B * d).to(dtype).requires_grad_()
    C = torch.randn(B, K, d).to(dtype).requires_grad_()
    P = centroid_scores(x, C)
    grad = torch.randn_like(P)
    P.backward(grad)

    x_ref, C_ref = x.detach().float().requires_grad_(), C.detach().float().requires_grad_()
    P_ref = torch.bmm(C_ref, x_ref.view(T, B, d).permute(1, 2, 0))
    P_ref.backward(grad.float())
    torch.testing.assert_close(P.float(), P_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(C.grad.float(), C_ref.grad, rtol=tol, atol=tol)
    assert x.grad.is_contiguous() and x.grad.dtype == dtype


def test_basis_linear_gradcheck_3d_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    C = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    codes = torch.randint(0, 4, (11, 2), generator=g)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, C, b: basis_linear(x, C, codes, b), (x, C, bias))


@pytest.mark.parametrize("with_bias", [True, False])
def test_basis_linear_matches_dense_layer(with_bias):
    g = torch.Generator().manual_seed(1)
    B, K, d, V = 4, 8, 5, 37
    x = torch.randn(3, 7, B * d, generator=g, requires_grad=True)
    C = torch.randn(B, K, d, generator=g, requires_grad=True)
    codes = torch.randint(0, K, (V, B), generator=g, dtype=torch.int16)
    bias = torch.randn(V, generator=g, requires_grad=True) if with_bias else None
    logits = basis_linear(x, C, codes, bias)
    grad = torch.randn(logits.shape, generator=g)
    logits.backward(grad)

    x_ref, C_ref = x.detach().clone().requires_grad_(), C.detach().clone().requires_grad_()
    b_ref = bias.detach().clone().requires_grad_() if with_bias else None
    W = torch.cat([C_ref[b][codes[:, b].long()] for b in range(B)], dim=1)  # (V, H)
    ref = torch.nn.functional.linear(x_ref, W, b_ref)
    ref.backward(grad)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    for got, want in [(x, x_ref), (C, C_ref)] + ([(bias, b_ref)] if with_bias else []):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)
    assert x.grad.shape == x.shape and x.grad.is_contiguous()
