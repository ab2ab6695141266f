"""PQ-aware training: train a dense model against the product quantization of its embedding / lm_head, then convert.

Converting a trained model fixes each word's codes at that moment (k-means of the final weights); the rest of the
network never saw the quantized layer, and the codes cannot follow it afterwards. Here the layer computes with its
product quantization from the start of the phase (k-means of the dense weight, as `convert` does), its centroids
train like a converted layer's, and a dense copy of the rows keeps getting each row's own gradient (straight
through):

    weight_used = reconstruct(codes, centroids) + (weight - weight.detach())

Every `refresh_steps` optimizer steps each row takes the codes nearest to its dense copy (its decoded row plus the
gradient steps since the last refresh), and the dense copy restarts from the decoded row (`pull`). So a word whose
gradient keeps pointing to another centroid moves there, which a converted layer's fixed codes never allow.
`hf_basis.convert` then takes the codebook as it is (no new k-means): the converted model computes exactly what the
last step trained.

    hf_basis.prepare_pq_aware_training(model, num_basis=8, num_clusters=384, modules="output",
                                       token_frequencies=counts)
    trainer = Trainer(model, ..., callbacks=[hf_basis.PQAwareTrainingCallback(refresh_steps=10)])  # a new Trainer:
                                                                             # its optimizer must see the centroids
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

from hf_basis.compress.pq import encode, product_quantize, reconstruct, relative_error
from hf_basis.integrations.config import LAYER_CHOICES
from hf_basis.modules.codebook import Codebook
from hf_basis.validation import as_row_weights, check_basis_shape, check_choice, check_seed

__all__ = [
    "FakeProductQuantize",
    "PQAwareTrainingCallback",
    "fake_quantizers",
    "prepare_pq_aware_training",
    "trained_codebook",
]


def _share_changed(codes: torch.Tensor, before: torch.Tensor) -> float:
    """The fraction of words (rows) whose codes differ between two (V, B) code tables."""
    return float((codes != before).any(dim=1).float().mean())


class FakeProductQuantize(nn.Module):
    """A parametrization of a (V, D) weight: its product quantization forward, gradients to the centroids and,
    straight through, to the dense weight.

    `codes` (V, B) int64 buffer and `centroids` (B, K, d) trainable parameter: the codebook `hf_basis.convert` takes
    over. The centroids get the gradient a BasisLinear's centroids get (the sum over the words that use them), so the
    layer learns as fast as a converted one; the dense rows get their own gradient, which is what lets a word change
    its codes: `refresh(weight)` gives every row the codes nearest to it (the decoded row plus the gradient steps
    since the last refresh), then moves the dense row `pull` of the way back to its decoded row.
    """

    def __init__(self, weight: torch.Tensor, num_basis: int, num_clusters: int, *,
                 sample_weight: torch.Tensor | None = None, seed: int = 0) -> None:
        super().__init__()
        self.num_basis, self.num_clusters = num_basis, num_clusters
        result = product_quantize(weight.detach(), num_basis, num_clusters, seed=seed, sample_weight=sample_weight)
        self.register_buffer("codes", result.codes.long())
        self.centroids = nn.Parameter(result.centroids.to(weight.dtype))
        self.relative_error = result.relative_error

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        quantized = reconstruct(self.codes, self.centroids.to(weight.dtype))
        return quantized + (weight - weight.detach())  # value: the quantized rows; gradient: also to the dense ones

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor, pull: float = 1.0) -> float:
        """Re-assign every row of `weight` to its nearest centroids, then move the dense rows `pull` (0..1) of the
        way to their decoded rows (in place; 1: the dense rows restart from the codebook, so only the gradient steps
        of the last refresh interval decide a change of codes). Returns the fraction of rows whose codes changed."""
        codes = encode(weight, self.centroids).long()
        changed = _share_changed(codes, self.codes)
        self.codes.copy_(codes)
        self.relative_error = relative_error(weight.detach(), self.codes, self.centroids.detach())
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
    check_choice(modules, "modules", LAYER_CHOICES)
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
    """For `hf_basis.convert`: the codebook a PQ-aware trained layer was trained with, as a Codebook (in the
    centroids' dtype) and its relative error to the dense weight; None for a layer that was not prepared. Settings
    other than the layer's are refused (the codes would not fit them)."""
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
    book = Codebook(*dense.shape, num_basis, num_clusters, device=dense.device, dtype=quantizer.centroids.dtype)
    with torch.no_grad():
        book.codes.copy_(quantizer.codes)
        book.centroids.copy_(quantizer.centroids)
    book.centroids.requires_grad_(quantizer.centroids.requires_grad)
    return book, relative_error(dense.detach(), quantizer.codes, quantizer.centroids.detach())


class PQAwareTrainingCallback(TrainerCallback):
    """Re-assigns the codes of a model prepared by `prepare_pq_aware_training` every `refresh_steps` optimizer
    steps (`FakeProductQuantize.refresh`; `pull` < 1 keeps part of the dense rows' own path between refreshes), and
    appends to the log history each epoch the mean fraction of words whose codes changed per refresh
    (`pq_codes_changed`), the fraction of words whose codes at the epoch's end differ from those at its start
    (`pq_codes_moved`: tells words that settle on new codes from words that flip back and forth between refreshes)
    and the relative distance of the dense rows to their decoded rows before the last refresh (`pq_relative_error`)."""

    def __init__(self, refresh_steps: int = 10, pull: float = 1.0) -> None:
        if isinstance(refresh_steps, bool) or not isinstance(refresh_steps, int) or refresh_steps < 1:
            raise ValueError(f"refresh_steps must be a positive integer, got {refresh_steps!r}")
        if not 0.0 <= pull <= 1.0:
            raise ValueError(f"pull must be in [0, 1], got {pull!r}")
        self.refresh_steps, self.pull = refresh_steps, pull
        self._changed: list[float] = []
        self._epoch_start_codes: list[torch.Tensor] = []

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self._epoch_start_codes = [q.codes.clone() for _, q in fake_quantizers(model)] if model is not None else []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.refresh_steps:
            return
        for layer, quantizer in fake_quantizers(model):
            self._changed.append(quantizer.refresh(layer.parametrizations.weight.original, self.pull))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        quantizers = fake_quantizers(model) if model is not None else []
        if quantizers and self._changed:
            entry = {"epoch": state.epoch, "step": state.global_step,
                     "pq_codes_changed": sum(self._changed) / len(self._changed)}
            if len(self._epoch_start_codes) == len(quantizers):
                entry["pq_codes_moved"] = sum(_share_changed(q.codes, start)
                                              for (_, q), start in zip(quantizers, self._epoch_start_codes)
                                              ) / len(quantizers)
            entry["pq_relative_error"] = sum(q.relative_error for _, q in quantizers) / len(quantizers)
            state.log_history.append(entry)
        self._changed = []
