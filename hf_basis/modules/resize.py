"""Resizing the per-word bias of a compressed output layer (`BasisLinear.resize_`, `QuantLinear.resize_`)."""

from __future__ import annotations

import torch

__all__ = ["resize_bias_"]


def resize_bias_(bias: torch.Tensor, size: int, new_values: torch.Tensor | None = None) -> None:
    """Truncate `bias` to `size` entries or append `new_values` (zeros if None), in place of its `.data`, so every
    other reference to the tensor (BERT's `cls.predictions.bias`) follows, as transformers' `_adjust_bias` does."""
    added = size - bias.shape[0]
    data = bias.data[:size]
    if added > 0:
        extra = torch.zeros(added, dtype=bias.dtype, device=bias.device) if new_values is None else new_values
        data = torch.cat([data, extra.detach().to(bias.device, bias.dtype).reshape(added)])
    bias.data = data.contiguous()
