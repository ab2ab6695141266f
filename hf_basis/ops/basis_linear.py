"""Basis output layer: logits = x @ W^T + bias with W product-quantized, never building W.

    P_b = C_b @ h_b^T            (the centroid projection; one small bmm for all sub-spaces)
    logits[t, w] = bias[w] + sum_b P[b, code[w, b], t]   (the decode; see basis_decode.py)

Cost O(T*K*H + T*V*B) instead of O(T*V*H). The projection, the decode and their composition `basis_linear` are
PyTorch custom ops with autograd (torch.compile and torch.export trace through them). `basis_linear` is one op, so an
eager call is one autograd.Function (one node in the backward graph) rather than two: at 128 tokens on a GPU the
eager forward + backward is paced by the host, and each Function costs its apply, its node and its Python backward.
"""

from __future__ import annotations

import torch

from hf_basis.ops.basis_decode import check_codes_and_bias, decode_backward_op, decode_impl
from hf_basis.ops.custom_op import hf_basis_op

__all__ = ["basis_linear", "centroid_scores", "centroid_scores_backward"]


def centroid_scores_backward(
    grad_P: torch.Tensor, x: torch.Tensor, centroids: torch.Tensor, need_x: bool = True, need_centroids: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of x (..., H) and centroids (B, K, d) given grad_P (B, K, T), T = x.numel() / H (last dim
    contiguous, any row stride).

    grad_x is written by the bmm straight into x's (T, B, d) layout through a permuted view (no copy afterwards).
    Casts only where dtypes differ: a `.to` to the same dtype is still a dispatcher call.
    """
    T = grad_P.shape[2]
    B, _, d = centroids.shape
    if grad_P.dtype != centroids.dtype:  # under autocast the forward bmm may have run in a lower precision
        grad_P = grad_P.to(centroids.dtype)
    grad_x = grad_centroids = None
    if need_x:
        buf = torch.empty(T, B, d, dtype=centroids.dtype, device=centroids.device)
        torch.bmm(centroids.transpose(1, 2), grad_P, out=buf.permute(1, 2, 0))  # (B, d, T) in x's layout
        grad_x = buf.view(x.shape) if x.dtype == buf.dtype else buf.view(x.shape).to(x.dtype)
    if need_centroids:
        x_t = x.reshape(T, B, d).transpose(0, 1)
        grad_centroids = torch.bmm(grad_P, x_t if x_t.dtype == grad_P.dtype else x_t.to(grad_P.dtype))  # (B, K, d)
    return grad_x, grad_centroids


def _centroid_scores_impl(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    B, _, d = centroids.shape
    return torch.bmm(centroids, x.reshape(-1, B, d).permute(1, 2, 0))  # (B, K, T), T = x.numel() / H


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


def _basis_linear_impl(
    x: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    logits = decode_impl(_centroid_scores_impl(x, centroids), codes, bias)  # (T, V)
    return logits if x.dim() == 2 else logits.view(*x.shape[:-1], codes.shape[0])


def _basis_linear_fake(x, centroids, codes, bias):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def _basis_linear_setup_context(ctx, inputs, output):
    x, centroids, codes, bias = inputs
    ctx.save_for_backward(x, centroids, codes)
    ctx.P_dtype = output.dtype  # the projection's dtype (lower than the centroids' under autocast)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _basis_linear_backward(ctx, grad_logits: torch.Tensor):
    x, centroids, codes = ctx.saved_tensors
    need_x, need_centroids, _, need_bias = ctx.needs_input_grad
    if grad_logits.dim() != 2:
        grad_logits = grad_logits.reshape(-1, codes.shape[0])
    grad_P, grad_bias = decode_backward_op(
        grad_logits, codes, centroids.shape[1], need_bias, ctx.P_dtype,
        ctx.bias_dtype or torch.float32,
    )
    grad_x = grad_centroids = None
    if need_x or need_centroids:
        grad_x, grad_centroids = _centroid_scores_backward_op(grad_P, x, centroids, need_x, need_centroids)
    grad_bias = grad_bias if need_bias else None
    return grad_x if need_x else None, grad_centroids if need_centroids else None, None, grad_bias


_basis_linear_op = hf_basis_op("basis_linear", _basis_linear_impl, _basis_linear_fake, _basis_linear_setup_context,
                               _basis_linear_backward)


def basis_linear(
    x: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of a product-quantized linear layer. x: (..., H), centroids: (B, K, H/B), codes: (V, B) -> (..., V).

    Gradients flow to x, centroids and bias; codes are fixed integers. One op (`torch.ops.hf_basis.basis_linear`):
    the projection and the decode with a single backward (the decode's backward, then the projection's).
    """
    B, _, d = centroids.shape
    if x.shape[-1] != B * d:
        raise ValueError(f"x has {x.shape[-1]} features but the codebook expects {B * d} (num_basis {B} x {d})")
    check_codes_and_bias(codes, bias, B)
    return _basis_linear_op(x, centroids, codes, bias)
