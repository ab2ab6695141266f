"""The PreTrainedModel methods that assume a dense nn.Embedding / nn.Linear, made to work on a converted model.

* `resize_token_embeddings(n, pad_to_multiple_of=..., mean_resizing=...)`: transformers builds new dense layers in
  `_get_resized_embeddings` / `_get_resized_lm_head` (and raises for anything else). The versions here resize a
  compressed layer in place instead: its first rows are kept exactly (codes / packed rows), added rows are the rows
  transformers would have added, compressed with the layer's existing codebook or level table (nearest centroids /
  levels; the centroids and levels do not change), and a shrink drops the last rows. With `mean_resizing=True` (the
  default) transformers draws new rows from N(mean, 1e-9 * covariance) of the old rows, i.e. the mean row: every
  added row gets the codes of the mean row, and an untied head's added bias is the mean bias. With
  `mean_resizing=False` the rows come from the model's `_init_weights`, as for a dense model. Ties are kept (one
  shared codebook / table), and `model.hf_basis_config` / `config.quantization_config` get the new shapes, so the
  resized model saves and loads. transformers' `resize_token_embeddings` itself then updates `config.vocab_size`.
* `num_parameters(exclude_embeddings=True)`: transformers leaves out the `.weight` of every nn.Embedding; a compressed
  input embedding holds its trainable values as `codebook.centroids`, which are left out the same way.

`install_model_methods(model)` (called by `hf_basis.convert` and after loading an hf_basis checkpoint) binds these to
the model instance; for layers that are not compressed they call transformers' own implementation.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from hf_basis.integrations.record import get_record, set_record, storage_attr
from hf_basis.integrations.serialization import attach_quantization_config
from hf_basis.modules.basis_embedding import BasisEmbedding
from hf_basis.modules.basis_linear import BasisLinear
from hf_basis.modules.quant_embedding import QuantEmbedding, QuantLinear

__all__ = ["install_model_methods"]

_EMBEDDINGS = (BasisEmbedding, QuantEmbedding)
_HEADS = (BasisLinear, QuantLinear)


def _storage(layer: nn.Module) -> nn.Module:
    """The layer's compressed table (a Codebook or QuantizedTable), possibly shared with a tied layer."""
    return getattr(layer, storage_attr(layer))


def _target_rows(rows: int, new_num_tokens: int | None, pad_to_multiple_of: int | None) -> int | None:
    """The row count transformers' `_get_resized_embeddings` computes (None: nothing to do)."""
    if pad_to_multiple_of is not None:
        if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
        new_num_tokens = rows if new_num_tokens is None else new_num_tokens
        new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
    if new_num_tokens is not None and (isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int)):
        raise ValueError(f"new_num_tokens must be an integer, got {new_num_tokens!r}")
    return new_num_tokens


def _added_rows(
    model: nn.Module, layer: nn.Module, added: int, mean_resizing: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (added, D) rows (and, for a head with a bias, the (added,) bias) transformers would append to the dense
    version of `layer`."""
    bias = getattr(layer, "bias", None)
    if mean_resizing:
        with torch.no_grad():
            weight = layer.weight.detach().float()  # (V, D), decoded once
            rows = weight.mean(0).expand(added, -1)
            new_bias = None if bias is None else bias.detach().float().mean().expand(added)
        return rows, new_bias
    D = layer.embedding_dim if isinstance(layer, _EMBEDDINGS) else layer.in_features
    if isinstance(layer, _EMBEDDINGS):
        fresh: nn.Module = nn.Embedding(added, D)
    else:
        fresh = nn.Linear(D, added, bias=bias is not None)
    model._init_weights(fresh)  # the model's own initialisation, as transformers' mean_resizing=False
    return fresh.weight.detach(), None if bias is None else fresh.bias.detach()


def _record_shapes(model: nn.Module) -> None:
    """Write the compressed layers' current shapes into `model.hf_basis_config` and re-attach the
    quantization_config, so that a resized model saves and reloads with its new vocabulary."""
    record = get_record(model)
    layers = {}
    for name, info in record["layers"].items():
        storage = _storage(model.get_submodule(name))
        layers[name] = dict(info, shape=[storage.num_embeddings, storage.embedding_dim])
    set_record(model, dict(record, layers=layers))
    attach_quantization_config(model)


def _resize(model: nn.Module, layer: nn.Module, rows: int, mean_resizing: bool) -> None:
    storage = _storage(layer)
    added = rows - storage.num_embeddings
    new_rows = new_bias = None
    if added > 0:
        new_rows, new_bias = _added_rows(model, layer, added, mean_resizing)
    # else: shrinking, or a tied head whose shared table the embedding already grew (its bias is padded with zeros,
    # as transformers' `_adjust_bias` pads a tied dense head's bias).
    if isinstance(layer, _HEADS):
        layer.resize_(rows, new_rows, new_bias)
    else:
        layer.resize_(rows, new_rows)
    _record_shapes(model)


def _get_resized_embeddings(
    self: nn.Module,
    old_embeddings: nn.Module,
    new_num_tokens: int | None = None,
    pad_to_multiple_of: int | None = None,
    mean_resizing: bool = True,
) -> nn.Module:
    if not isinstance(old_embeddings, _EMBEDDINGS):
        return type(self)._get_resized_embeddings(self, old_embeddings, new_num_tokens, pad_to_multiple_of,
                                                  mean_resizing)  # fmt: skip
    rows = _target_rows(old_embeddings.num_embeddings, new_num_tokens, pad_to_multiple_of)
    if rows is not None:
        _resize(self, old_embeddings, rows, mean_resizing)
    return old_embeddings


def _get_resized_lm_head(
    self: nn.Module,
    old_lm_head: nn.Module,
    new_num_tokens: int | None = None,
    transposed: bool = False,
    mean_resizing: bool = True,
) -> nn.Module:
    if not isinstance(old_lm_head, _HEADS):
        return type(self)._get_resized_lm_head(self, old_lm_head, new_num_tokens, transposed, mean_resizing)
    if new_num_tokens is not None:
        _resize(self, old_lm_head, _target_rows(old_lm_head.out_features, new_num_tokens, None), mean_resizing)
    return old_lm_head


def num_parameters(self: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    total = type(self).num_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    if exclude_embeddings:
        # transformers leaves out `<name>.weight` of each nn.Embedding; leave out a compressed embedding's tensors.
        prefixes = tuple(f"{name}." for name, module in self.named_modules() if isinstance(module, _EMBEDDINGS))
        total -= sum(
            p.numel() for name, p in self.named_parameters()
            if name.startswith(prefixes) and (p.requires_grad or not only_trainable)
        )  # fmt: skip
    return total


_METHODS: dict[str, Any] = {
    "_get_resized_embeddings": _get_resized_embeddings,
    "_get_resized_lm_head": _get_resized_lm_head,
    "num_parameters": num_parameters,
}


def install_model_methods(model: nn.Module) -> None:
    """Bind the methods above to `model` (a converted or loaded hf_basis model). Idempotent."""
    for name, function in _METHODS.items():
        setattr(model, name, types.MethodType(function, model))
