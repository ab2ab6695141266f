"""PQ-aware training: train a dense model against the product quantization of its embedding / lm_head, then convert.

Converting a trained model fixes each word's codes at that moment (k-means of the final weights); the rest of the
network never saw the quantized layer, and the codes cannot follow it afterwards. Here the dense layers keep training,
but their forward uses the product quantization of the current weight, and the gradient passes straight through to
the dense weight (quantization-aware training with a straight-through estimator):

    weight_used = weight + (reconstruct(codes, centroids) - weight).detach()

Every `refresh_steps` optimizer steps one weighted Lloyd iteration moves the codebook to the current weights
(`product_quantize(..., init_centroids=..., max_iter=1)`): words whose rows moved get new codes, centroids become the
(frequency-weighted) means of their rows again. The rest of the model learns to work with the quantized layers while
the codes still move. `hf_basis.convert` then takes these codebooks as they are (no new k-means), so the converted
model computes exactly what the last step trained.

    hf_basis.prepare_pq_aware_training(model, num_basis=8, num_clusters=384, modules="output",
                                       token_frequencies=counts)
    trainer = Trainer(model, ..., callbacks=[hf_basis.PQAwareTrainingCallback(refresh_steps=10)])
    trainer.train()
    hf_basis.convert(model, num_basis=8, num_clusters=384, modules="output")   # exact: uses the trained codebook

The dense weight is kept during this phase (it is what the gradient steps move), so training costs what dense training
costs; the savings come with the conversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import TrainerCallback

from hf_basis.compress.pq import product_quantize, reconstruct, relative_error
from hf_basis.modules.codebook import Codebook
from hf_basis.validation import as_row_weights, check_basis_shape, check_choice, check_seed

__all__ = [
    "FakeProductQuantize", "PQAwareTrainingCallback", "fake_quantizers", "prepare_pq_aware_training", "trained_codebook",
]

MODULE_CHOICES = ("both", "input", "output")


class FakeProductQuantize(nn.Module):
    """A parametrization of a (V, D) weight: its product quantization forward, the identity backward.

    Buffers: `codes` (V, B) int64 and `centroids` (B, K, d) float32 — the codebook `hf_basis.convert` takes over —
    and the optional (V,) k-means row weights. `refresh(weight)` moves the codebook to `weight` by one Lloyd
    iteration and returns the fraction of codes that changed.
    """

    def __init__(self, weight: torch.Tensor, num_basis: int, num_clusters: int, *,
                 sample_weight: torch.Tensor | None = None, seed: int = 0) -> None:
        super().__init__()
        self.num_basis, self.num_clusters = num_basis, num_clusters
        result = product_quantize(weight.detach(), num_basis, num_clusters, seed=seed, sample_weight=sample_weight)
        self.register_buffer("codes", result.codes.long())
        self.register_buffer("centroids", result.centroids)
        self.register_buffer("sample_weight", None if sample_weight is None else sample_weight.to(weight.device))
        self.relative_error = result.relative_error

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        quantized = reconstruct(self.codes, self.centroids.to(weight.dtype))
        return weight + (quantized - weight).detach()  # value: quantized; gradient: straight to the dense weight

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor, pull: float = 0.0) -> float:
        """One Lloyd step to `weight`; then, with `pull` > 0, move the dense rows that fraction of the way to their
        new quantized rows (in place). Returns the fraction of rows whose codes changed."""
        result = product_quantize(
            weight.detach(), self.num_basis, self.num_clusters, max_iter=1, init_centroids=self.centroids,
            sample_weight=self.sample_weight,
        )
        changed = float((result.codes.long() != self.codes).any(dim=1).float().mean())
        self.codes.copy_(result.codes)
        self.centroids.copy_(result.centroids)
        self.relative_error = result.relative_error
        if pull:
            weight.lerp_(reconstruct(self.codes, self.centroids).to(weight.dtype), pull)
        return changed


def _layers(model: nn.Module, modules: str) -> list[nn.Module]:
    emb = model.get_input_embeddings() if modules in ("both", "input") else None
    head = model.get_output_embeddings() if modules in ("both", "output") else None
    return [layer for layer in (emb, head) if layer is not None]


def prepare_pq_aware_training(
    model: nn.Module,
    num_basis: int = 8,
    num_clusters: int = 256,
    *,
    modules: str = "both",
    token_frequencies: torch.Tensor | Sequence[float] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Make the input embedding and/or lm_head train against their product quantization (see the module docstring).

    In place; returns the model. The arguments are `hf_basis.convert`'s: pass the same ones to convert afterwards.
    token_frequencies: (V,) counts weighting the k-means (and every refresh), as in `convert`.
    """
    check_choice(modules, "modules", MODULE_CHOICES)
    check_seed(seed)
    layers = _layers(model, modules)
    if len(layers) != (2 if modules == "both" else 1):
        raise ValueError(f"{type(model).__name__} lacks the input embedding or lm_head that modules={modules!r} names")
    if len(layers) == 2 and layers[0].weight is layers[1].weight:
        raise NotImplementedError("tied input and output embeddings: PQ-aware training supports untied layers only "
                                  "(use modules='input' or 'output', or convert directly)")
    for layer in layers:
        if not isinstance(layer, (nn.Embedding, nn.Linear)):
            raise TypeError(f"{type(layer).__name__}: PQ-aware training needs an nn.Embedding / nn.Linear")
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"the {type(layer).__name__}'s weight is already parametrized (prepared twice?)")
        check_basis_shape(layer.weight.shape[0], layer.weight.shape[1], num_basis, num_clusters)
    weights = None
    if token_frequencies is not None:
        weights = as_row_weights(token_frequencies, "token_frequencies")
        if weights.shape != (layers[0].weight.shape[0],):
            raise ValueError(f"token_frequencies must have one entry per token ({layers[0].weight.shape[0]}), "
                             f"got shape {tuple(weights.shape)}")
    quantizers = [FakeProductQuantize(layer.weight, num_basis, num_clusters, sample_weight=weights, seed=seed)
                  for layer in layers]  # every k-means before the model is touched
    for layer, quantizer in zip(layers, quantizers):
        parametrize.register_parametrization(layer, "weight", quantizer)
    return model


def fake_quantizers(model: nn.Module) -> list[tuple[nn.Module, FakeProductQuantize]]:
    """(layer, its FakeProductQuantize) for every layer of `model` prepared by `prepare_pq_aware_training`."""
    found = []
    for layer in model.modules():
        if parametrize.is_parametrized(layer, "weight"):
            found += [(layer, p) for p in layer.parametrizations.weight if isinstance(p, FakeProductQuantize)]
    return found


def trained_codebook(layer: nn.Module, num_basis: int, num_clusters: int) -> tuple[Codebook, float] | None:
    """For `hf_basis.convert`: the codebook a PQ-aware trained layer was trained with, as a Codebook (in the weight's
    dtype) and its relative error to the dense weight; None for a layer that was not prepared. Settings other than
    the layer's are refused (the codes would not fit them)."""
    found = [q for owner, q in fake_quantizers(layer) if owner is layer]
    if not found:
        return None
    quantizer = found[0]
    if (quantizer.num_basis, quantizer.num_clusters) != (num_basis, num_clusters):
        raise ValueError(
            f"this layer was PQ-aware trained with num_basis={quantizer.num_basis}, num_clusters="
            f"{quantizer.num_clusters}; convert it with the same settings (got {num_basis}, {num_clusters})"
        )
    dense = layer.parametrizations.weight.original
    book = Codebook(*dense.shape, num_basis, num_clusters, device=dense.device, dtype=dense.dtype)
    with torch.no_grad():
        book.codes.copy_(quantizer.codes)
        book.centroids.copy_(quantizer.centroids)
    book.centroids.requires_grad_(dense.requires_grad)
    return book, relative_error(dense.detach(), quantizer.codes, quantizer.centroids)


class PQAwareTrainingCallback(TrainerCallback):
    """Refreshes the codebooks of a model prepared by `prepare_pq_aware_training` every `refresh_steps` optimizer
    steps (and, with `pull` > 0, moves the dense rows that fraction of the way to their quantized rows: without it a
    row whose gradient never changes its code drifts away from it, since its quantized value gives no feedback), and appends to the log history each epoch the mean fraction of words whose codes changed and the relative
    reconstruction error (`pq_codes_changed`, `pq_relative_error`)."""

    def __init__(self, refresh_steps: int = 10, pull: float = 0.0) -> None:
        if isinstance(refresh_steps, bool) or not isinstance(refresh_steps, int) or refresh_steps < 1:
            raise ValueError(f"refresh_steps must be a positive integer, got {refresh_steps!r}")
        if not 0.0 <= pull <= 1.0:
            raise ValueError(f"pull must be in [0, 1], got {pull!r}")
        self.refresh_steps, self.pull = refresh_steps, pull
        self._changed: list[float] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.refresh_steps:
            return
        for layer, quantizer in fake_quantizers(model):
            self._changed.append(quantizer.refresh(layer.parametrizations.weight.original, self.pull))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        quantizers = fake_quantizers(model) if model is not None else []
        if quantizers and self._changed:
            state.log_history.append({
                "epoch": state.epoch, "step": state.global_step,
                "pq_codes_changed": sum(self._changed) / len(self._changed),
                "pq_relative_error": sum(q.relative_error for _, q in quantizers) / len(quantizers),
            })
        self._changed = []
