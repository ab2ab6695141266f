"""The patcher: swap a model's input embedding and output layer for compressed modules, in place.

`convert` finds the two modules by identity through `get_input_embeddings()` / `get_output_embeddings()`, builds
every replacement first (k-means PQ or clipping, on the weights' device), and only then swaps them in, so an error
leaves the model untouched. What was done is recorded in `model.hf_basis_config` (a JSON-serialisable dict).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hf_basis.modules.basis_embedding import BasisEmbedding
from hf_basis.modules.basis_linear import BasisLinear
from hf_basis.modules.quant_embedding import QuantEmbedding, QuantLinear, quantize_embed
from hf_basis.progress import iteration_callback, progress_bar
from hf_basis.validation import as_row_weights, check_basis_shape, check_nbit

__all__ = ["convert", "quantize_embed", "COMPRESSED_MODULES"]

METHODS = ("basis", "quant")
MODULE_CHOICES = ("both", "input", "output")
COMPRESSED_MODULES = (BasisEmbedding, BasisLinear, QuantEmbedding, QuantLinear)

logger = logging.getLogger(__name__)


def _is_alias(module: nn.Module | None, target: nn.Module) -> bool:
    """`module` stands for `target`: the same object, or a layer of the same type holding the same weight tensor
    (transformers 5 ties e.g. T5's `encoder.embed_tokens` to `shared` by parameter, not by module)."""
    return module is target or (type(module) is type(target) and getattr(module, "weight", None) is target.weight)


def _names_of(model: nn.Module, target: nn.Module) -> list[str]:
    """Every attribute path under which `target` (or an alias of it) is reachable, shortest first."""
    names = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if _is_alias(child, target):
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return sorted(set(names), key=lambda n: (n.count("."), n))


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Point every reference to `old` (or an alias) inside `model` at `new`, and every other reference to its bias
    parameter at the new bias (BERT's MLM head keeps `cls.predictions.bias` as the same tensor as the decoder's)."""
    old_bias = getattr(old, "bias", None)
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if _is_alias(child, old):
                setattr(parent, child_name, new)
        for param_name, param in list(parent._parameters.items()):
            if old_bias is not None and param is old_bias:
                parent._parameters[param_name] = new.bias


def _check_plain(module: nn.Module, base: type, role: str) -> None:
    if isinstance(module, COMPRESSED_MODULES):
        raise ValueError(
            f"the {role} is already a {type(module).__name__}: convert() compresses a model once; "
            "load the dense model again to convert it with other settings"
        )
    if not isinstance(module, base):
        raise TypeError(f"the {role} is a {type(module).__name__}, but convert() can only compress an {base.__name__}")
    if type(module).forward is not base.forward:
        # A subclass with its own forward (e.g. a scaled embedding) would silently lose that behaviour.
        other = {"input embedding": "modules='output' compresses the output layer alone",
                 "output layer": "modules='input' compresses the input embedding alone"}[role]  # fmt: skip
        raise NotImplementedError(
            f"the {role} is a {type(module).__name__}, a subclass of {base.__name__} with its own forward; "
            f"hf_basis does not know how to reproduce it, so it refuses instead of changing the model's outputs "
            f"({other})"
        )


def _check_token_frequencies(
    token_frequencies: torch.Tensor | Sequence[float], emb: nn.Embedding | None, head: nn.Linear | None
) -> torch.Tensor:
    """`token_frequencies` as a 1-D tensor with one entry per row of the layers to compress (their vocabulary).

    Checked here (before anything is built or the model touched) so that errors name `token_frequencies`, not
    product_quantize's `sample_weight`.
    """
    frequencies = as_row_weights(token_frequencies, "token_frequencies")
    vocab_sizes = {layer.weight.shape[0] for layer in (emb, head) if layer is not None}
    if len(vocab_sizes) != 1:  # untied layers of different vocabularies: one frequency per token id cannot fit both
        raise ValueError(
            f"token_frequencies needs one vocabulary, but the input embedding and the output layer have "
            f"{sorted(vocab_sizes)} rows"
        )
    (vocab_size,) = vocab_sizes
    if frequencies.dim() != 1 or frequencies.shape[0] != vocab_size:
        raise ValueError(
            f"token_frequencies must be 1-D of length {vocab_size} (the vocabulary size, one entry per token id), "
            f"got shape {tuple(frequencies.shape)}"
        )
    return frequencies


def _check_head_input_moment(moment, method: str, head: nn.Linear | None, tied: bool) -> None:
    """Checked before anything is built, so that errors name `head_input_moment`."""
    if method != "basis":
        raise ValueError('head_input_moment applies to method="basis" (it fits the k-means codebook); leave it unset')
    if head is None:
        raise ValueError("head_input_moment applies to the output layer: use modules='output' or 'both'")
    if tied:
        raise ValueError(
            "head_input_moment needs an untied output layer: this model's lm_head shares its weight (and would "
            "share its codebook) with the input embedding, which is judged by its rows, not by logits"
        )
    if not torch.is_tensor(moment) or moment.is_complex() or not moment.is_floating_point():
        raise ValueError(f"head_input_moment must be a real floating-point tensor, got {type(moment).__name__}"
                         + (f" of {moment.dtype}" if torch.is_tensor(moment) else ""))
    H = head.in_features
    if tuple(moment.shape) != (H, H):
        raise ValueError(f"head_input_moment must be ({H}, {H}) (the lm_head's input size), got {tuple(moment.shape)}")
    if not bool(torch.isfinite(moment).all()):
        raise ValueError("head_input_moment contains NaN or infinite values")


def _kmeans_bar(model: nn.Module, layer: nn.Module | None):
    """A progress bar over the k-means iterations of one layer (none for a layer that shares another's codebook)."""
    if layer is None:
        return progress_bar(disable=True)
    V, H = layer.weight.shape
    return progress_bar(desc=f"hf_basis k-means of {_names_of(model, layer)[0]} ({V} x {H})", unit="it")


def convert(
    model: nn.Module,
    num_basis: int = 8,
    num_clusters: int = 256,
    *,
    method: str = "basis",
    nbit: int = 4,
    modules: str = "both",
    seed: int = 0,
    stochastic_round: bool = False,
    token_frequencies: torch.Tensor | Sequence[float] | None = None,
    head_input_moment: torch.Tensor | None = None,
) -> nn.Module:
    """Compress the input embedding and/or the output layer (lm_head) of a model, in place; returns the model.

    Args:
        model: a transformers `PreTrainedModel` (anything with `get_input_embeddings` / `get_output_embeddings`).
        num_basis: method="basis": sub-vectors per word (must divide the hidden size).
        num_clusters: method="basis": centroids per sub-space, 2 .. min(vocab size, 32768).
        method: "basis" (product quantization, trainable centroids: BasisEmbedding / BasisLinear) or
            "quant" (SmallFry clipped uniform quantization, frozen: QuantEmbedding / QuantLinear).
        nbit: method="quant": bits per value, one of 1, 2, 4, 8, 16, 32.
        modules: "both", "input" (embedding only) or "output" (lm_head only).
        seed: k-means++ seed (method="basis") or stochastic-rounding seed (method="quant").
        stochastic_round: method="quant": stochastic instead of deterministic rounding.
        token_frequencies: method="basis" only: a 1-D tensor or sequence of length V (the vocabulary size), each
            token's count or probability in the training data. The k-means of the input embedding and of the output
            layer (both have one row per token id) is then weighted by it, so frequent tokens get the most accurate
            rows; rare ones still get codes. Non-negative, finite, not all zero. Recorded as
            `hf_basis_config["token_frequency_weighted"]`. The reported relative errors stay unweighted.
        head_input_moment: method="basis", untied output layer only: the (H, H) second moment E[h h^T] of the
            hidden states that enter the lm_head, from `hf_basis.head_input_moment(model, batches)` on a few
            batches of representative data. The output layer's codebook is then fitted to the error of the logits
            (sum_w f_w (w - w^)^T E[h h^T] (w - w^), f = token_frequencies or 1) instead of the error of the rows:
            k-means first, then alternating code / centroid updates (`hf_basis.compress.activation_aware`).
            Recorded as `hf_basis_config["activation_aware"]`.

    Tied input/output embeddings stay tied: both modules share one Codebook (or QuantizedTable).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if modules not in MODULE_CHOICES:
        raise ValueError(f"modules must be one of {list(MODULE_CHOICES)}, got {modules!r}")
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        if not hasattr(model, accessor):
            raise TypeError(f"convert() needs a model with {accessor}() (a transformers PreTrainedModel)")
    if method == "quant":
        check_nbit(nbit)
        if token_frequencies is not None:
            raise ValueError(
                'token_frequencies applies to method="basis" (frequency-weighted k-means); '
                'method="quant" has no k-means to weight: leave it unset'
            )

    emb = model.get_input_embeddings() if modules in ("both", "input") else None
    head = model.get_output_embeddings() if modules in ("both", "output") else None
    if modules in ("both", "input") and emb is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings; use modules='output'")
    if modules in ("both", "output") and head is None:
        hint = "; use modules='input'" if modules == "both" else ""
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head){hint}")
    if emb is not None:
        _check_plain(emb, nn.Embedding, "input embedding")
    if head is not None:
        _check_plain(head, nn.Linear, "output layer")
    tied = emb is not None and head is not None and head.weight is emb.weight
    if method == "basis":
        for layer in (emb, head):
            if layer is not None:
                check_basis_shape(layer.weight.shape[0], layer.weight.shape[1], num_basis, num_clusters)
    frequencies = None
    if token_frequencies is not None:
        frequencies = _check_token_frequencies(token_frequencies, emb, head)
    if head_input_moment is not None:
        _check_head_input_moment(head_input_moment, method, head, tied)

    # Build every replacement before touching the model: an error below leaves it as it was.
    new_emb = new_head = None
    errors: dict[str, float] = {}
    for layer in (emb, head if not tied else None):
        if layer is not None:
            what = f"{num_basis} x {num_clusters} basis codes" if method == "basis" else f"{nbit}-bit values"
            logger.info("hf_basis: compressing %s (%s x %s) into %s%s", _names_of(model, layer)[0],
                        *layer.weight.shape, what, " (tied input and output)" if tied else "")  # fmt: skip
    if method == "basis":
        if emb is not None:
            with _kmeans_bar(model, emb) as bar:
                new_emb, errors["input"] = BasisEmbedding.from_embedding(
                    emb, num_basis, num_clusters, seed=seed, sample_weight=frequencies,
                    progress=iteration_callback(bar),
                )
        if head is not None:
            shared = new_emb.codebook if tied else None
            with _kmeans_bar(model, head if not tied else None) as bar:
                new_head, errors["output"] = BasisLinear.from_linear(
                    head, num_basis, num_clusters, seed=seed, codebook=shared, sample_weight=frequencies,
                    input_moment=head_input_moment, progress=iteration_callback(bar),
                )
    else:
        quant_kwargs: dict[str, Any] = {"stochastic_round": stochastic_round, "seed": seed}
        if emb is not None:
            new_emb = QuantEmbedding(
                emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, _weight=emb.weight.detach(),
                nbit=nbit, dtype=emb.weight.dtype, **quant_kwargs,
            )
            errors["input"] = new_emb.table.relative_error
        if head is not None:
            shared = new_emb.table if tied else None
            new_head = QuantLinear.from_linear(head, nbit, table=shared, **quant_kwargs)
            errors["output"] = new_head.table.relative_error
    if tied:
        errors["output"] = errors["input"]

    layers: dict[str, dict[str, Any]] = {}
    emb_names = _names_of(model, emb) if emb is not None else []
    for role, old, new in (("input", emb, new_emb), ("output", head, new_head)):
        if old is None:
            continue
        names = _names_of(model, old)
        layers[names[0]] = {
            "role": role,
            "kind": type(new).__name__,
            "aliases": names[1:],
            "shape": list(old.weight.shape),
            "dense_dtype": str(old.weight.dtype).removeprefix("torch."),
            "relative_error": float(errors[role]),
            "tied_to": emb_names[0] if (role == "output" and tied) else None,
        }
        _replace(model, old, new)

    model.hf_basis_config = {
        "method": method,
        "num_basis": num_basis if method == "basis" else None,
        "num_clusters": num_clusters if method == "basis" else None,
        "nbit": nbit if method == "quant" else None,
        "modules": modules,
        "seed": seed,
        "stochastic_round": stochastic_round if method == "quant" else None,
        "tied": tied,
        "token_frequency_weighted": frequencies is not None,
        "activation_aware": head_input_moment is not None,
        "layers": layers,
    }
    # Imported here: hf_basis.integrations imports this module (compress-on-load), so a top-level import would cycle.
    from hf_basis.integrations.fused_loss import install_fused_loss
    from hf_basis.integrations.serialization import attach_quantization_config

    attach_quantization_config(model)  # quantization_config in config.json, tied-tensor names, atomic save, push
    install_fused_loss(model)  # training calls with labels go through the fused basis cross-entropy
    return model
