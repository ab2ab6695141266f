"""nn.Embedding's `max_norm` for compressed tables: looked-up rows whose norm exceeds it come out scaled down to it.

nn.Embedding rescales the looked-up rows of its weight in place (under no_grad) before the lookup. A compressed table
cannot be rewritten row by row (a basis row is made of centroids that other words share; a quantized table is frozen),
so the same scale is applied to the looked-up rows instead: the values returned are nn.Embedding's, the stored table
is left as it is, and the scale is a constant for autograd, as nn.Embedding's no_grad renorm is.
"""

from __future__ import annotations

import torch

__all__ = ["renorm_rows"]


def renorm_rows(rows: torch.Tensor, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """rows (..., D) -> (..., D): rows with ||row||_p > max_norm times max_norm / (||row||_p + 1e-7), nn.Embedding's
    formula (`torch.embedding_renorm_`); the others unchanged."""
    with torch.no_grad():
        norms = torch.linalg.vector_norm(rows, ord=norm_type, dim=-1, keepdim=True)  # (..., 1)
        scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
    return rows * scale
