"""Basis output layer: logits = x @ W^T + bias with W product-quantized, never building W.

    P_b = C_b @ h_b^T            (the centroid projection; one small bmm for all sub-spaces)
    logits[t, w] = bias[w] + sum_b P[b, code[w, b], t]   (the decode; see basis_decode.py)

Cost O(T*K*H + T*V*B) instead of O(T*V*H). The projection and the decode are each a PyTorch custom op with
autograd (torch.compile and torch.export trace through them).
"""

from __future__ import annotations

import torch

from hf_basis.ops.basis_decode import basis_decode
from hf_basis.ops.custom_op import hf_basis_op

__all__ = ["basis_linear", "centroid_scores", "centroid_scores_backward"]


def centroid_scores_backward(
    grad_P: torch.Tensor, x: torch.Tensor, centroids: torch.Tensor, need_x: bool = True, need_centroids: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of x (T, H) and centroids (B, K, d) given grad_P (B, K, T) (last dim contiguous, any row stride).

    grad_x is written by the bmm straight into x's (T, B, d) layout through a permuted view (no copy afterwards).
    """
    T = x.shape[0]
    B, _, d = centroids.shape
    grad_P = grad_P.to(centroids.dtype)  # under autocast the forward bmm may have run in a lower precision
    grad_x = grad_centroids = None
    if need_x:
        buf = torch.empty(T, B, d, dtype=centroids.dtype, device=centroids.device)
        torch.bmm(centroids.transpose(1, 2), grad_P, out=buf.permute(1, 2, 0))  # (B, d, T) in x's layout
        grad_x = buf.view(T, B * d).to(x.dtype)
    if need_centroids:
        grad_centroids = torch.bmm(grad_P, x.reshape(T, B, d).transpose(0, 1).to(centroids.dtype))  # (B, K, d)
    return grad_x, grad_centroids


def _centroid_scores_impl(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    T = x.shape[0]
    B, _, d = centroids.shape
    return torch.bmm(centroids, x.reshape(T, B, d).permute(1, 2, 0))  # (B, K, T)


def _centroid_scores_fake(x, centroids):
    B, K, _ = centroids.shape
    return centroids.new_empty(B, K, x.shape[0])


def _centroid_scores_backward_impl(
    grad_P: torch.Tensor, x: torch.Tensor, centroids: torch.Tensor, need_x: bool, need_centroids: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """centroid_scores_backward as an op: the gradients not needed come back empty (an op returns tensors only)."""
    grad_x, grad_centroids = centroid_scores_backward(grad_P, x, centroids, need_x, need_centroids)
    empty = centroids.new_empty(0)
    return grad_x if grad_x is not None else empty, grad_centroids if grad_centroids is not None else empty.clone()


def _centroid_scores_backward_fake(grad_P, x, centroids, need_x, need_centroids):
    grad_x = x.new_empty(x.shape) if need_x else centroids.new_empty(0)
    return grad_x, centroids.new_empty(centroids.shape if need_centroids else (0,))


def _centroid_scores_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _centroid_scores_backward(ctx, grad_P: torch.Tensor):
    x, centroids = ctx.saved_tensors
    need_x, need_centroids = ctx.needs_input_grad[:2]
    grad_x, grad_centroids = _centroid_scores_backward_op(grad_P, x, centroids, need_x, need_centroids)
    return grad_x if need_x else None, grad_centroids if need_centroids else None


_centroid_scores_backward_op = hf_basis_op("centroid_scores_backward", _centroid_scores_backward_impl,
                                           _centroid_scores_backward_fake)
_centroid_scores_op = hf_basis_op("centroid_scores", _centroid_scores_impl, _centroid_scores_fake,
                                  _centroid_scores_setup_context, _centroid_scores_backward)


def centroid_scores(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """P = per-sub-space centroid scores. x: (T, H), centroids: (B, K, d) with H = B*d -> P: (B, K, T).

    The (B, K, T) layout puts consecutive tokens of one centroid next to each other, which is what the decode
    gathers: `torch.bmm(C, x.view(T, B, d).permute(1, 2, 0))` yields it without a copy of P.
    A custom op (`torch.ops.hf_basis.centroid_scores`) whose backward writes grad_x straight into x's (T, H) layout:
    plain autograd through the bmm returns grad_x as a (B, d, T) tensor that the reshape back to (T, H) must copy;
    here the backward bmm writes into a (T, B, d) buffer through a permuted view (cuBLAS takes that column-major
    output as it is), which saves one pass over grad_x. Being an op keeps that `out=` (which dynamo refuses) out of
    compiled graphs.
    """
    return _centroid_scores_op(x, centroids)


def basis_linear(
    x: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of a product-quantized linear layer. x: (..., H), centroids: (B, K, H/B), codes: (V, B) -> (..., V).

    Gradients flow to x, centroids and bias; codes are fixed integers.
    """
    B, _, d = centroids.shape
    if x.shape[-1] != B * d:
        raise ValueError(f"x has {x.shape[-1]} features but the codebook expects {B * d} (num_basis {B} x {d})")
    lead = x.shape[:-1]
    logits = basis_decode(centroid_scores(x.reshape(-1, B * d), centroids), codes, bias)  # (T, V)
    return logits.view(*lead, codes.shape[0])
