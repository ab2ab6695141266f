"""The patchers: swap a model's input embedding and output layer (`convert`), or every embedding (`quantize_embed`),
for compressed modules, in place.

`convert` finds the two modules by identity through `get_input_embeddings()` / `get_output_embeddings()`; both
patchers check every argument and build every replacement first (k-means PQ or clipping, on the weights' device),
and only then swap them in, so an error leaves the model untouched. What was done is recorded in
`model.hf_basis_config` through `hf_basis.integrations.record`, the record's one owner.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hf_basis.integrations.config import LAYER_CHOICES, METHODS
from hf_basis.integrations.fused_loss import install_fused_loss
from hf_basis.integrations.model_methods import install_model_methods
from hf_basis.integrations.record import (
    COMPRESSED_MODULES, extended_record, layer_entry, names_of, replace_module, set_record,
)  # fmt: skip
from hf_basis.integrations.serialization import attach_quantization_config
from hf_basis.modules.basis_embedding import BasisEmbedding
from hf_basis.modules.basis_linear import BasisLinear
from hf_basis.modules.quant_embedding import QuantEmbedding, QuantLinear
from hf_basis.validation import (
    as_row_weights, check_basis_shape, check_bool, check_choice, check_nbit, check_seed,
)  # fmt: skip
from hf_basis.pq_aware_training import trained_codebook
from hf_basis.progress import iteration_callback, progress_bar

__all__ = ["convert", "quantize_embed"]

logger = logging.getLogger(__name__)


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
    return progress_bar(desc=f"hf_basis k-means of {names_of(model, layer)[0]} ({V} x {H})", unit="it")


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
    check_choice(method, "method", METHODS)
    check_choice(modules, "modules", LAYER_CHOICES)
    check_seed(seed)
    check_bool(stochastic_round, "stochastic_round")
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
    settings = {
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
    }
    extended_record(model, settings, {})  # a clash with an earlier conversion is refused before any k-means

    # Build every replacement before touching the model: an error below leaves it as it was.
    new_emb = new_head = None
    errors: dict[str, float] = {}
    for layer in (emb, head if not tied else None):
        if layer is not None:
            what = f"{num_basis} x {num_clusters} basis codes" if method == "basis" else f"{nbit}-bit values"
            logger.info("hf_basis: compressing %s (%s x %s) into %s%s", names_of(model, layer)[0],
                        *layer.weight.shape, what, " (tied input and output)" if tied else "")  # fmt: skip
    if method == "basis":
        # Layers prepared by hf_basis.prepare_pq_aware_training keep the codebook they were trained against.
        trained = {role: trained_codebook(layer, num_basis, num_clusters) if layer is not None else None
                   for role, layer in (("input", emb), ("output", head))}  # fmt: skip
        if trained["output"] is not None and head_input_moment is not None:
            raise ValueError("head_input_moment fits a new codebook, but the lm_head was PQ-aware trained: its "
                             "trained codebook is used as it is; leave head_input_moment unset")
        if trained["input"] is not None:
            new_emb, _ = BasisEmbedding.from_embedding(emb, num_basis, num_clusters, codebook=trained["input"][0])
            errors["input"] = trained["input"][1]
        elif emb is not None:
            with _kmeans_bar(model, emb) as bar:
                new_emb, errors["input"] = BasisEmbedding.from_embedding(
                    emb, num_basis, num_clusters, seed=seed, sample_weight=frequencies,
                    progress=iteration_callback(bar),
                )
        if trained["output"] is not None:
            new_head, _ = BasisLinear.from_linear(head, num_basis, num_clusters, codebook=trained["output"][0])
            errors["output"] = trained["output"][1]
        elif head is not None:
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
                emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, max_norm=emb.max_norm,
                norm_type=emb.norm_type, _weight=emb.weight.detach(), nbit=nbit, dtype=emb.weight.dtype, **quant_kwargs,
            )
            errors["input"] = new_emb.table.relative_error
        if head is not None:
            shared = new_emb.table if tied else None
            new_head = QuantLinear.from_linear(head, nbit, table=shared, **quant_kwargs)
            errors["output"] = new_head.table.relative_error
    if tied:
        errors["output"] = errors["input"]

    layers: dict[str, dict[str, Any]] = {}
    swaps = [(role, old, new) for role, old, new in (("input", emb, new_emb), ("output", head, new_head))
             if old is not None]  # fmt: skip
    for role, old, new in swaps:
        tied_to = names_of(model, emb)[0] if role == "output" and tied else None
        name, layers[name] = layer_entry(model, role, old, new, errors[role], tied_to)
    record = extended_record(model, settings, layers)
    untie = _shared_dense_weight(model) and modules != "both"
    for _, old, new in swaps:
        replace_module(model, old, new)
    if untie:
        _untie_config(model, "lm_head" if modules == "output" else "input embedding", f"modules={modules!r}")
    _finish(model, record)
    return model


def quantize_embed(
    module: nn.Module, nbit: int = 32, *, stochastic_round: bool = False, seed: int | None = None
) -> nn.Module:
    """Replace every nn.Embedding inside `module` by a QuantEmbedding (SmallFry's helper), in place.

    Keeps padding_idx, device and dtype. An embedding reachable under several names, or several nn.Embedding holding
    one weight (T5's shared / encoder / decoder embeddings), becomes ONE QuantEmbedding referenced by all of them.
    Subclasses of nn.Embedding that override forward (scaled or offset embeddings) are left alone with a warning,
    since replacing them would change the model's outputs. Every argument is checked and every table built before
    anything is replaced. On a transformers model the replaced layers are recorded (modules="embeddings"), so it
    saves and loads like `convert(model, method="quant")`; a tied lm_head stays dense and is untied, with a warning.
    Returns `module`, or its replacement if `module` itself is an nn.Embedding.
    """
    check_nbit(nbit)
    check_bool(stochastic_round, "stochastic_round")
    check_seed(seed, allow_none=True)

    def replacement(emb: nn.Embedding) -> QuantEmbedding:
        return QuantEmbedding(
            emb.num_embeddings, emb.embedding_dim, emb.padding_idx, emb.max_norm, emb.norm_type,
            emb.scale_grad_by_freq, emb.sparse, _weight=emb.weight, nbit=nbit,
            stochastic_round=stochastic_round, seed=seed, dtype=emb.weight.dtype,
        )  # fmt: skip

    def own_forward(emb: nn.Module) -> bool:
        return type(emb).forward is not nn.Embedding.forward

    if isinstance(module, nn.Embedding) and not own_forward(module):
        return replacement(module)
    found: dict[int, nn.Embedding] = {}  # id(weight) -> the first embedding holding it
    skipped: list[str] = []
    for name, child in module.named_modules(remove_duplicate=False):  # a module registered twice is seen twice
        if isinstance(child, nn.Embedding):
            if own_forward(child):
                skipped.append(f"{name or '<root>'} ({type(child).__name__})")
            else:
                found.setdefault(id(child.weight), child)
    swaps = [(old, replacement(old)) for old in found.values()]
    record = untie = None
    if swaps and hasattr(module, "get_input_embeddings"):
        settings = {
            "method": "quant", "num_basis": None, "num_clusters": None, "nbit": nbit, "modules": "embeddings",
            "seed": seed, "stochastic_round": stochastic_round, "tied": False, "token_frequency_weighted": False,
            "activation_aware": False,
        }  # fmt: skip
        extended_record(module, settings, {})
        emb = module.get_input_embeddings()
        emb_weight = getattr(emb, "_parameters", {}).get("weight")
        layers: dict[str, dict[str, Any]] = {}
        for old, new in swaps:
            role = "input" if emb_weight is not None and old.weight is emb_weight else "embedding"
            name, layers[name] = layer_entry(module, role, old, new, new.table.relative_error, None)
        record = extended_record(module, settings, layers)
        untie = emb_weight is not None and id(emb_weight) in found and _shared_dense_weight(module)
    for old, new in swaps:
        replace_module(module, old, new)
    if skipped:
        warnings.warn(
            "quantize_embed left these nn.Embedding subclasses with their own forward unchanged: " + ", ".join(skipped),
            stacklevel=2,
        )
    if untie:
        _untie_config(module, "input embedding", "quantize_embed")
    if record is not None:
        _finish(module, record)
    return module


def _shared_dense_weight(model: nn.Module) -> bool:
    """The model's (still dense) input embedding and output layer hold one weight tensor."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(emb, "_parameters", {}).get("weight")
    return weight is not None and getattr(head, "_parameters", {}).get("weight") is weight


def _untie_config(model: nn.Module, compressed: str, how: str) -> None:
    """After compressing one side of a tied pair the other side keeps the dense matrix: the two are no longer one
    tensor. Say so, and make the config say so (transformers would otherwise tie them again on load), unless the
    config class forces the tie (T5 in transformers 5: its loader ties `shared` and `lm_head` by name, which the
    compressed head no longer has). Other ties the config governed (BERT's decoder.bias) become two tensors, as in a
    model built untied, so that both are saved."""
    dense = "input embedding" if compressed == "lm_head" else "lm_head"
    untied = False
    config = getattr(model, "config", None)
    old_ties = dict(getattr(model, "all_tied_weights_keys", None) or {})
    if config is not None:
        for cfg in {id(c): c for c in (config, config.get_text_config(decoder=True))}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
                if type(cfg).from_dict(cfg.to_dict()).tie_word_embeddings:
                    cfg.tie_word_embeddings = True  # the class re-ties on load whatever is written: leave it
                else:
                    untied = True
    if untied and hasattr(model, "get_expanded_tied_weights_keys"):
        ties = model.get_expanded_tied_weights_keys(all_submodels=True)
        state = model.state_dict(keep_vars=True)
        for target, source in old_ties.items():
            if target not in ties and target in state and state.get(source) is state[target]:
                owner, _, attr = target.rpartition(".")
                module = model.get_submodule(owner)
                module._parameters[attr] = nn.Parameter(state[target].detach().clone(),
                                                        requires_grad=state[target].requires_grad)  # fmt: skip
        model.all_tied_weights_keys = ties
    warnings.warn(
        f"the input embedding and lm_head of {type(model).__name__} were tied; {how} compressed the {compressed} "
        f"only, so the {dense} stays dense and the two are now untied"
        + (" (config.tie_word_embeddings=False)" if untied else "")
        + ". Use hf_basis.convert(model, modules='both') to compress both through one shared table and keep them tied",
        UserWarning,
        stacklevel=3,
    )


def _finish(model: nn.Module, record: dict[str, Any]) -> None:
    """Store the record and make the model save, load and train as an hf_basis model."""
    set_record(model, record)
    attach_quantization_config(model)  # quantization_config in config.json, tied-tensor names, atomic save, push
    install_fused_loss(model)  # training calls with labels go through the fused basis cross-entropy
    install_model_methods(model)  # resize_token_embeddings, num_parameters(exclude_embeddings=True)
