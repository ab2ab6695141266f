"""Basis output layer: logits = x @ W^T + bias with W product-quantized, never building W.

    P_b = C_b @ h_b^T            (the centroid projection; one small bmm for all sub-spaces)
    logits[t, w] = bias[w] + sum_b P[b, code[w, b], t]   (the decode; see basis_decode.py)

Cost O(T*K*H + T*V*B) instead of O(T*V*H). Autograd through the bmm is PyTorch's; the decode is an autograd Function.
"""

from __future__ import annotations

import torch

from hf_basis.ops.basis_decode import basis_decode

__all__ = ["basis_linear", "centroid_scores"]


def centroid_scores(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """P = per-sub-space centroid scores. x: (T, H), centroids: (B, K, d) with H = B*d -> P: (B, K, T).

    The (B, K, T) layout puts consecutive tokens of one centroid next to each other, which is what the decode
    gathers: `torch.bmm(C, x.view(T, B, d).permute(1, 2, 0))` yields it without a copy of P.
    """
    T = x.shape[0]
    B, _, d = centroids.shape
    return torch.bmm(centroids, x.reshape(T, B, d).permute(1, 2, 0))


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
