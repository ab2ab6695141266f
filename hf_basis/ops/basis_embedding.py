"""Basis embedding lookup: row w of the (never built) V x D table is concat_b C[b, code[w, b]]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["basis_embedding"]


def basis_embedding(
    input_ids: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor, padding_idx: int | None = None
) -> torch.Tensor:
    """Look up rows. input_ids: (...) long, codes: (V, B), centroids: (B, K, d) -> (..., B*d) in centroids' dtype.

    One `F.embedding` over the flattened centroid table (B*K, d): its backward is PyTorch's embedding backward
    (a scatter into B*K rows, deterministic when deterministic algorithms are requested), so no V x D gradient
    is ever formed. As in nn.Embedding, `padding_idx` only stops gradients: positions holding it return the row's
    own value (a trained [PAD], or a pad id shared with eos / unk) but send no gradient to the centroids.
    Token ids outside [0, V) raise IndexError (CPU) or a device-side assert (CUDA), as nn.Embedding does.
    """
    B, K, d = centroids.shape
    offsets = torch.arange(B, device=codes.device, dtype=torch.long) * K
    # F.embedding on the integer codes gives nn.Embedding's own IndexError for ids outside [0, V).
    rows = F.embedding(input_ids, codes).long() + offsets  # (..., B) ids into the flat table
    out = F.embedding(rows, centroids.reshape(B * K, d))  # (..., B, d)
    out = out.reshape(*input_ids.shape, B * d)
    if padding_idx is not None:
        out = torch.where((input_ids == padding_idx).unsqueeze(-1), out.detach(), out)
    return out
