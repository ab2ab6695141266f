"""Calibration statistics for activation-aware conversion: what the output layer sees.

    moment = hf_basis.head_input_moment(model, batches)          # E[h h^T] of the lm_head's input, (H, H)
    hf_basis.convert(model, num_basis=8, num_clusters=384, modules="output", head_input_moment=moment)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from hf_basis.progress import progress_bar

__all__ = ["head_input_moment"]


def head_input_moment(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor], max_tokens: int | None = None
) -> torch.Tensor:
    """Second moment E[h h^T] (H, H) float32 of the hidden states h entering the model's output layer.

    Runs `model(**batch)` (or `model(batch)` for a tensor of input ids) on each batch in eval mode without gradients,
    moving tensors to the model's device, and averages h h^T over every token position; positions whose
    `attention_mask` is 0 are left out. In an encoder-decoder model (T5, BART) the output layer sees the decoder's
    positions: there `decoder_attention_mask` is the mask (the encoder's `attention_mask` describes other positions),
    and without one every decoder position counts. Stops after `max_tokens` positions if given. The model's training
    mode is restored afterwards. Raises ValueError if no position was seen, or if the mask does not have one entry
    per position the output layer sees.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no output layer (get_output_embeddings() returned {head!r})")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    device = next(model.parameters()).device
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    mask_key = "decoder_attention_mask" if encoder_decoder else "attention_mask"
    state = {"sum": None, "count": 0, "mask": None}

    def accumulate(module, args):
        h = args[0].detach()
        mask = state["mask"]
        if mask is not None and tuple(mask.shape) != tuple(h.shape[:-1]):
            raise ValueError(
                f"{mask_key} has shape {tuple(mask.shape)} but the output layer's input has {tuple(h.shape[:-1])} "
                "positions: pass one mask entry per position the output layer sees"
            )
        h = h.reshape(-1, h.shape[-1]) if mask is None else h[mask]
        if max_tokens is not None:
            h = h[: max_tokens - state["count"]]
        h = h.double()
        state["sum"] = h.T @ h if state["sum"] is None else state["sum"] + h.T @ h
        state["count"] += h.shape[0]

    was_training = model.training
    handle = head.register_forward_pre_hook(accumulate)
    try:
        model.eval()
        with torch.no_grad():
            for batch in progress_bar(batches, desc="hf_basis head_input_moment", unit="batch"):
                if torch.is_tensor(batch):
                    batch = {"input_ids": batch}
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                mask = batch.get(mask_key)
                state["mask"] = mask.bool() if mask is not None else None
                model(**batch)
                if max_tokens is not None and state["count"] >= max_tokens:
                    break
    finally:
        handle.remove()
        model.train(was_training)
    if state["count"] == 0:
        raise ValueError("head_input_moment saw no token positions: pass at least one non-empty batch")
    return (state["sum"] / state["count"]).float()
