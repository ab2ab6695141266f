"""The conversion record: which layers of a model hf_basis compressed, how, and under which names.

`model.hf_basis_config` (a JSON-serialisable dict, the in-memory form of `BasisConfig`) is owned here: `convert` and
`quantize_embed` extend it with `extended_record` and store it with `set_record`; the quantizer stores the one it
rebuilds after loading with `set_record`; serialization, `report`, the model card and the CLI read it with
`get_record`. Also here: the model surgery both writers and `dequantize` need (every name of a layer, pointing them
all at a replacement), so that no two modules keep their own copy of it.

Layout: {method, num_basis, num_clusters, nbit, modules, seed, stochastic_round, tied, token_frequency_weighted,
activation_aware, layers: {module name: {role, kind, aliases, shape, dense_dtype, relative_error, tied_to}}}.
`role` is "input" (the model's input embedding), "output" (its lm_head) or "embedding" (any other nn.Embedding,
compressed by `quantize_embed`, whose record has modules="embeddings").
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hf_basis.integrations.config import BasisConfig
from hf_basis.modules.basis_embedding import BasisEmbedding
from hf_basis.modules.basis_linear import BasisLinear
from hf_basis.modules.quant_embedding import QuantEmbedding, QuantLinear

__all__ = [
    "COMPRESSED_MODULES", "extended_record", "get_record", "layer_entry", "names_of", "replace_module", "set_record",
    "storage_attr",
]  # fmt: skip

COMPRESSED_MODULES = (BasisEmbedding, BasisLinear, QuantEmbedding, QuantLinear)
# What must agree between two calls that compress parts of one model: one record describes every layer with one
# set of these (the checkpoint's quantization_config has no per-layer settings).
_SETTINGS = ("method", "num_basis", "num_clusters", "nbit", "seed", "stochastic_round")


def storage_attr(module: nn.Module) -> str:
    """Name of the submodule of a compressed layer that holds its table: 'codebook' (basis) or 'table' (quant)."""
    return "codebook" if "codebook" in module._modules else "table"


def _is_alias(module: nn.Module | None, target: nn.Module) -> bool:
    """`module` stands for `target`: the same object, or a layer of the same type holding the same weight tensor
    (transformers 5 ties e.g. T5's `encoder.embed_tokens` to `shared` by parameter, not by module)."""
    return module is target or (type(module) is type(target) and getattr(module, "weight", None) is target.weight)


def names_of(model: nn.Module, target: nn.Module) -> list[str]:
    """Every attribute path under which `target` (or an alias of it) is reachable, shortest first."""
    names = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if _is_alias(child, target):
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return sorted(set(names), key=lambda n: (n.count("."), n))


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
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


def layer_entry(
    model: nn.Module, role: str, old: nn.Module, new: nn.Module, relative_error: float, tied_to: str | None
) -> tuple[str, dict[str, Any]]:
    """(primary name, record entry) of the dense layer `old` of `model`, about to be replaced by `new`."""
    names = names_of(model, old)
    return names[0], {
        "role": role,
        "kind": type(new).__name__,
        "aliases": names[1:],
        "shape": list(old.weight.shape),
        "dense_dtype": str(old.weight.dtype).removeprefix("torch."),
        "relative_error": float(relative_error),
        "tied_to": tied_to,
    }


def get_record(model: nn.Module) -> dict[str, Any] | None:
    """The model's conversion record, or None if hf_basis compressed nothing in it."""
    return model.__dict__.get("hf_basis_config")


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={settings.get(k)!r}" for k in _SETTINGS if settings.get(k) is not None)


def extended_record(model: nn.Module, settings: dict[str, Any], layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The record of `model` once `layers` (compressed with `settings`) are added to what it already records.

    Pure: raises ValueError (naming what clashes) and leaves the model alone when the result could not be saved
    and loaded back: a second call with other settings, or one that mixes `quantize_embed` and `convert`. The
    result is checked by `BasisConfig`, the form it is saved in, so an invalid record never reaches the model.
    """
    old = get_record(model)
    record = dict(settings, layers=dict(layers))
    if old:
        clash = [k for k in _SETTINGS if old.get(k) != settings.get(k)]
        if clash or "embeddings" in (old["modules"], settings["modules"]):
            raise ValueError(
                f"this model already holds layers compressed by hf_basis ({_describe(old)}, modules="
                f"{old['modules']!r}); a second call can only compress the other one of input embedding / lm_head "
                f"with the same settings, but got {_describe(settings)}, modules={settings['modules']!r}. Load the "
                "dense model again to compress it with other settings, or compress both in one call"
            )
        roles = {info["role"] for info in (*old["layers"].values(), *layers.values())}
        record.update(
            layers={**old["layers"], **layers},
            modules="both" if roles == {"input", "output"} else old["modules"],
            tied=bool(old["tied"] or settings["tied"]),
            token_frequency_weighted=bool(old["token_frequency_weighted"] or settings["token_frequency_weighted"]),
            activation_aware=bool(old["activation_aware"] or settings["activation_aware"]),
        )
    if record["layers"]:  # (empty: a caller checking for a clash before building anything)
        BasisConfig.from_hf_basis_config(record)  # raises ValueError on anything a checkpoint could not hold
    return record


def set_record(model: nn.Module, record: dict[str, Any]) -> None:
    """Store `record` as the model's conversion record (`model.hf_basis_config`)."""
    model.hf_basis_config = record
