"""The centroid projection's hand-written backward against autograd through the plain bmm."""

import pytest
import torch

from hf_basis.ops.basis_linear import centroid_scores


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
