"""HfBasisQuantizer: how `from_pretrained` builds and checks hf_basis models (quant_method "hf_basis").

Two paths, chosen by transformers:

* pre-quantized checkpoint (config.json has `quantization_config.quant_method == "hf_basis"`):
  `_process_model_before_weight_loading` swaps the dense input embedding / output layer of the meta-device model for
  compressed shells of the exact saved shapes (from `BasisConfig.layers`) and checks the checkpoint's safetensors
  headers against them (missing tensors, shapes, integer dtypes), so a bad checkpoint fails before anything is read
  instead of being silently "initialised"; the loader then fills the shells like any other module.
  `_process_model_after_weight_loading` restores the ties (one Codebook / QuantizedTable shared by the tied layers
  and by every alias name) and checks the loaded values (codes < num_clusters, nothing left on the meta device).
* dense checkpoint + `quantization_config=BasisConfig(...)`: the dense model loads as usual and is compressed by
  `hf_basis.convert` in `_process_model_after_weight_loading`. Peak memory is the dense model plus the compressed
  tables (k-means runs on the loaded weights).

While loading, a layer that shares its table with another one holds a placeholder without tensors instead of the
shared table, so each compressed tensor appears exactly once in the model's state dict, under the name it is saved
with. (transformers would otherwise treat the shared names as missing keys and overwrite the shared integer buffers
with uninitialised memory; its tied-weight machinery only handles parameters, not integer buffers.)

Only the hooks that transformers 5.17 through 5.24 share are used: `validate_environment`,
`_process_model_before_weight_loading`, `_process_model_after_weight_loading`, `is_serializable`,
`is_trainable`, `is_qat_trainable`, `param_needs_quantization` (default False).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantizer

from hf_basis.integrations.config import QUANT_METHOD, BasisConfig
from hf_basis.integrations.record import set_record, storage_attr

__all__ = ["HfBasisQuantizer", "CheckpointMismatchError"]

logger = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}  # fmt: skip


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors disagree with its `quantization_config` (hf_basis)."""


class TiedPlaceholder(nn.Module):
    """Stands, during `from_pretrained` only, where a module shared with `source` will be put back.

    It has no tensors, so the shared tensors are neither expected twice nor reported missing. Calling it means the
    after-loading hook did not run.
    """

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"placeholder for the module shared with {self.source!r}: the hf_basis model was not fully loaded"
        )

    def extra_repr(self) -> str:
        return f"source={self.source!r}"


def _all_names(model: nn.Module, target: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(full name, parent, attribute) of every reference to `target` inside `model`, primary name first."""
    found = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is target:
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                found.append((full, parent, child_name))
    unique = {full: (full, parent, attr) for full, parent, attr in found}
    # convert() names a layer by its shallowest, then alphabetically first, name: the same rule here.
    return [unique[k] for k in sorted(unique, key=lambda n: (n.count("."), n))]


def _rename(name: str, saved_primary: str, primary: str) -> str | None:
    """`name` from the checkpoint's model, in this model: the two may differ by a base-model prefix (e.g. a
    BertForMaskedLM checkpoint's `bert.embeddings...` is `embeddings...` in BertModel). None if it has no match."""
    if saved_primary == primary:
        return name
    if saved_primary.endswith("." + primary):  # this model lacks a prefix
        prefix = saved_primary[: -len(primary)]
        return name[len(prefix):] if name.startswith(prefix) else None
    if primary.endswith("." + saved_primary):  # this model adds a prefix
        return primary[: -len(saved_primary)] + name
    return name


def _build_shell(cfg: BasisConfig, role: str, dense: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A compressed module on the meta device with the shapes a checkpoint of `cfg` holds for `dense`'s place."""
    from hf_basis.modules.basis_embedding import BasisEmbedding
    from hf_basis.modules.basis_linear import BasisLinear
    from hf_basis.modules.quant_embedding import QuantEmbedding, QuantizedTable, QuantLinear

    meta = torch.device("meta")
    if role in ("input", "embedding"):
        V, D = dense.num_embeddings, dense.embedding_dim
        if cfg.method == "basis":
            return BasisEmbedding(V, D, cfg.num_basis, cfg.num_clusters, padding_idx=dense.padding_idx,
                                  max_norm=dense.max_norm, norm_type=dense.norm_type, device=meta, dtype=dtype)
        table = QuantizedTable(V, D, cfg.nbit, device=meta)
        return QuantEmbedding(V, D, padding_idx=dense.padding_idx, max_norm=dense.max_norm, norm_type=dense.norm_type,
                              nbit=cfg.nbit, table=table, device=meta, dtype=dtype)
    H, V = dense.in_features, dense.out_features
    has_bias = dense.bias is not None
    if cfg.method == "basis":
        return BasisLinear(H, V, cfg.num_basis, cfg.num_clusters, bias=has_bias, device=meta, dtype=dtype)
    table = QuantizedTable(V, H, cfg.nbit, device=meta)
    return QuantLinear(H, V, bias=has_bias, nbit=cfg.nbit, table=table, device=meta, dtype=dtype)


def _dense_shape(role: str, dense: nn.Module) -> tuple[int, int]:
    if role in ("input", "embedding"):
        return (dense.num_embeddings, dense.embedding_dim)
    return (dense.out_features, dense.in_features)


def _read_headers(checkpoint_files: list[str] | None) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]] | None:
    """{tensor name: (shape, dtype)} from the safetensors headers (nothing is read but the headers)."""
    if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        return None
    from safetensors import safe_open

    headers: dict[str, tuple[tuple[int, ...], torch.dtype | str]] = {}
    for file in checkpoint_files:
        with safe_open(os.fspath(file), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                dt = s.get_dtype()
                headers[key] = (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(dt, dt))
    return headers


def _find_key(headers: dict[str, Any], key: str, prefix: str) -> str | None:
    """The checkpoint name of `key`, allowing for the base-model prefix being there or not (as the loader does)."""
    candidates = [key]
    if prefix:
        candidates += [f"{prefix}.{key}", key.removeprefix(f"{prefix}.")]
    return next((c for c in candidates if c in headers), None)


def _stored_floats(storage: nn.Module, key: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """The floating values a compressed table stores under `key` (centroids, levels; a 32-bit table's packed
    bytes are float32 values), or None for integer codes."""
    if tensor.is_floating_point():
        return tensor
    if key == "packed" and getattr(storage, "nbit", None) == 32:
        return tensor.view(torch.float32)
    return None


class HfBasisQuantizer(HfQuantizer):
    """transformers quantizer for hf_basis checkpoints (see the module docstring for the two loading paths)."""

    requires_calibration = False

    def __init__(self, quantization_config: BasisConfig, **kwargs: Any) -> None:
        if isinstance(quantization_config, dict):
            quantization_config = BasisConfig(**quantization_config)
        super().__init__(quantization_config, **kwargs)
        self._shells: dict[str, nn.Module] = {}  # saved layer name -> its compressed module
        self._roles: dict[str, str] = {}
        self._pending: list[tuple[nn.Module, str, str, str | None]] = []
        self._shared: list[tuple[nn.Module, str, bool, str]] = []
        self._checked_headers = False

    # ------------------------------------------------------------------ properties transformers reads
    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # BasisEmbedding / BasisLinear train their centroids directly: Trainer must not demand a PEFT adapter.
        return True

    # ------------------------------------------------------------------ checks before anything is built
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        cfg = self.quantization_config
        if self.pre_quantized and not cfg.layers:
            raise CheckpointMismatchError(
                "this checkpoint's quantization_config (quant_method 'hf_basis') has no 'layers' entry, so the "
                "compressed modules cannot be rebuilt; was it written by hf_basis' save_pretrained?"
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and any(str(v) == "disk" for v in device_map.values()):
            raise ValueError("hf_basis does not support offloading to disk (device_map values 'disk')")

    # ------------------------------------------------------------------ before the weights load
    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            return model  # a dense checkpoint: compressed after loading
        cfg = self.quantization_config
        self._shells: dict[str, nn.Module] = {}
        # (parent, attribute, saved name of the shell to put back, its storage attribute or None for the shell)
        self._pending: list[tuple[nn.Module, str, str, str | None]] = []
        self._shared: list[tuple[nn.Module, str, bool, str]] = []  # (module, attribute, is_param, source name)
        self._roles: dict[str, str] = {}  # saved layer name -> role
        expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # checkpoint name -> (shape, dtype)
        own_tables: list[str] = []  # checkpoint prefixes a tied head must not have (its table is the embedding's)
        order = ("input", "output", "embedding")
        for saved_name, info in sorted(cfg.layers.items(), key=lambda item: order.index(item[1]["role"])):
            role = info["role"]
            if role == "embedding":
                old = self._find_embedding(model, saved_name)
            else:
                old = model.get_input_embeddings() if role == "input" else model.get_output_embeddings()
            if old is None:
                if role == "input":
                    raise CheckpointMismatchError(
                        f"the checkpoint has a compressed input embedding but {type(model).__name__} has none"
                    )
                # e.g. AutoModel on a causal-LM checkpoint: no head here, its tensors are unexpected keys.
                logger.info("hf_basis: %s has no output layer; %s is not loaded", type(model).__name__, saved_name)
                continue
            base = nn.Linear if role == "output" else nn.Embedding
            if not isinstance(old, base):
                raise CheckpointMismatchError(
                    f"hf_basis expected the {role} layer {saved_name} of {type(model).__name__} to be an "
                    f"{base.__name__}, got {type(old).__name__}"
                )
            if list(_dense_shape(role, old)) != list(info["shape"]):
                raise CheckpointMismatchError(
                    f"quantization_config.layers[{saved_name!r}] has shape {info['shape']}, but this model's config "
                    f"builds a {role} layer of shape {list(_dense_shape(role, old))} (vocab_size / hidden size "
                    "disagree with the compressed checkpoint)"
                )
            dtype = old.weight.dtype if old.weight.is_floating_point() else torch.get_default_dtype()
            shell = _build_shell(cfg, role, old, dtype)
            refs = _all_names(model, old)
            primary = refs[0][0]
            # The primary name gets the shell; every other name of this layer (identity or recorded alias) a
            # placeholder, so the tensors are expected once, under the name they were saved with.
            alias_names = {_rename(a, saved_name, primary) for a in info.get("aliases") or []}
            alias_names.update(name for name, _, _ in refs[1:])
            alias_names.discard(None)
            alias_names.discard(primary)
            parent, _, attr = primary.rpartition(".")
            model.get_submodule(parent)._modules[attr] = shell
            for alias in sorted(alias_names):
                p, _, a = alias.rpartition(".")
                try:
                    holder = model.get_submodule(p)
                except AttributeError:
                    continue
                if a in holder._modules:
                    holder._modules[a] = TiedPlaceholder(primary)
                    self._pending.append((holder, a, saved_name, None))
            tied_to = info.get("tied_to") if role == "output" else None
            if tied_to is not None and tied_to in self._shells:
                # The head's table is the embedding's: keep it out of the state dict until it is shared again.
                storage = storage_attr(shell)
                shell._modules[storage] = TiedPlaceholder(tied_to)
                self._pending.append((shell, storage, tied_to, storage))
                own_tables.append(f"{saved_name}.{storage}.")
            for key, source in (info.get("shared_tensors") or {}).items():
                # e.g. BERT's decoder.bias, saved once as cls.predictions.bias: loaded there, shared afterwards.
                owner_name, _, attr = key.rpartition(".")
                owner = shell.get_submodule(owner_name) if owner_name else shell
                is_param = attr in owner._parameters
                tensor = (owner._parameters if is_param else owner._buffers).pop(attr, None)
                current = _rename(source, saved_name, primary)
                if tensor is None or current is None:
                    raise CheckpointMismatchError(
                        f"quantization_config.layers[{saved_name!r}].shared_tensors names {key!r} -> {source!r}, "
                        f"which this model does not have"
                    )
                self._shared.append((owner, attr, is_param, current))
                expected[source] = (tuple(tensor.shape), tensor.dtype)
            self._shells[saved_name] = shell
            self._roles[saved_name] = role
            for key, tensor in shell.state_dict(keep_vars=True).items():
                expected[f"{saved_name}.{key}"] = (tuple(tensor.shape), tensor.dtype)
        self._retarget_tied_keys(model)
        headers = _read_headers(kwargs.get("checkpoint_files"))
        self._checked_headers = headers is not None
        if headers is not None:
            self._check_headers(model, expected, headers, own_tables)
        return model

    @staticmethod
    def _find_embedding(model: nn.Module, saved_name: str) -> nn.Module | None:
        """The module this model has where the checkpoint's `saved_name` was, with or without the base-model
        prefix (as the loader maps tensor names)."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        candidates = [saved_name]
        if prefix:
            candidates += [saved_name.removeprefix(prefix + "."), f"{prefix}.{saved_name}"]
        for name in candidates:
            try:
                return model.get_submodule(name)
            except AttributeError:
                continue
        raise CheckpointMismatchError(
            f"the checkpoint has a compressed embedding {saved_name!r} but {type(model).__name__} has no such module"
        )

    def _retarget_tied_keys(self, model: nn.Module) -> None:
        """Keep only tie entries between parameters that still exist (the dense embedding/head ones are gone)."""
        if not hasattr(model, "all_tied_weights_keys"):
            return
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        model.all_tied_weights_keys = {
            t: s for t, s in model.all_tied_weights_keys.items() if t in params and s in params
        }

    def _check_headers(self, model: nn.Module, expected: dict, headers: dict, own_tables: list[str]) -> None:
        prefix = getattr(model, "base_model_prefix", "") or ""
        problems = []
        for table in own_tables:
            # quantization_config says the head shares the embedding's table, yet the checkpoint holds one of its
            # own (e.g. "tied" edited into an untied checkpoint's config): loading would silently drop it.
            own = sorted(k for k in headers if k.startswith(table) or k.startswith(f"{prefix}.{table}"))
            if own:
                problems.append(
                    f"the output layer is declared tied to the input embedding (tied_to), but the checkpoint holds "
                    f"its own table {own}"
                )
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        for key, (shape, dtype) in expected.items():
            found = _find_key(headers, key, prefix)
            if found is None and key in tied:
                # Saved once under the name it is tied to (e.g. BERT's decoder.bias -> predictions.bias).
                found = _find_key(headers, tied[key], prefix)
            if found is None:
                problems.append(f"missing tensor {key}")
                continue
            got_shape, got_dtype = headers[found]
            if tuple(got_shape) != tuple(shape):
                problems.append(f"{found} has shape {list(got_shape)}, expected {list(shape)}")
            elif not isinstance(got_dtype, torch.dtype):
                problems.append(f"{found} has unsupported dtype {got_dtype}")
            elif dtype.is_floating_point != got_dtype.is_floating_point or (
                not dtype.is_floating_point and dtype != got_dtype
            ):
                problems.append(
                    f"{found} is {str(got_dtype).removeprefix('torch.')}, expected "
                    f"{str(dtype).removeprefix('torch.') if not dtype.is_floating_point else 'a floating dtype'}"
                )
        if problems:
            cfg = self.quantization_config
            raise CheckpointMismatchError(
                f"the checkpoint's tensors do not match its quantization_config ({cfg.settings()}): "
                + "; ".join(problems)
            )

    # ------------------------------------------------------------------ after the weights load
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from hf_basis.convert import convert, quantize_embed
        from hf_basis.integrations.serialization import attach_quantization_config

        if not self.pre_quantized:
            cfg = self.quantization_config
            if cfg.modules == "embeddings":
                quantize_embed(model, cfg.nbit, stochastic_round=bool(cfg.stochastic_round), seed=cfg.seed)
            else:
                convert(model, **cfg.convert_kwargs())
            self.quantization_config = model.config.quantization_config
            return model
        self._check_loaded(model)  # before the ties are restored: each loaded tensor is then seen once
        self._own_memory()
        self._restore_ties(model)
        set_record(model, self._hf_basis_config_for(model))
        self.quantization_config = attach_quantization_config(model)
        self._shells = {}
        from hf_basis.integrations.fused_loss import install_fused_loss
        from hf_basis.integrations.model_methods import install_model_methods

        install_fused_loss(model)  # train like a model fresh from convert(): fused basis cross-entropy
        install_model_methods(model)  # resize_token_embeddings, num_parameters as after convert()
        return model

    def _own_memory(self) -> None:
        """Copy the loaded CPU tensors of the compressed modules out of the checkpoint's memory map.

        A memory-mapped tensor sits at whatever offset the file gives it; CPU BLAS kernels may round differently
        on such addresses than on the allocator's aligned ones, so outputs would not be bit-identical to the
        saved model's. The copies are small (codes and centroids / packed values and levels).
        """
        for shell in self._shells.values():
            for module in shell.modules():
                for param in module._parameters.values():
                    if param is not None and param.device.type == "cpu":
                        param.data = param.data.clone()
                for name, buffer in module._buffers.items():
                    if buffer is not None and buffer.device.type == "cpu":
                        module._buffers[name] = buffer.clone()

    def _restore_ties(self, model: nn.Module) -> None:
        for parent, attr, key, storage in self._pending:
            real = self._shells[key]
            setattr(parent, attr, getattr(real, storage) if storage else real)
        for owner, attr, is_param, source in self._shared:
            tensor = model.get_parameter_or_buffer(source)
            if is_param:
                owner._parameters[attr] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor)
            else:
                owner._buffers[attr] = tensor.detach()
        self._pending, self._shared = [], []

    def _check_loaded(self, model: nn.Module) -> None:
        from hf_basis.modules.codebook import Codebook

        problems = []
        for name, shell in self._shells.items():
            for key, tensor in shell.state_dict(keep_vars=True).items():
                if tensor.device.type == "meta":
                    problems.append(f"{name} tensor {key} was not loaded")
                elif not self._checked_headers and not getattr(tensor, "_is_hf_initialized", False):
                    problems.append(f"{name} tensor {key} is missing from the checkpoint")
        if problems:
            raise CheckpointMismatchError("hf_basis: " + "; ".join(problems))
        for name, shell in self._shells.items():
            role = self._roles[name]
            storage = getattr(shell, storage_attr(shell), None)
            for key, tensor in (storage.state_dict(keep_vars=True).items() if storage is not None else ()):
                values = _stored_floats(storage, key, tensor)
                if values is not None and not bool(torch.isfinite(values).all()):
                    raise CheckpointMismatchError(
                        f"the checkpoint's {role} layer {name} holds NaN or infinite values in {key}: a compressed "
                        "table must be finite (corrupted checkpoint)"
                    )
            book = getattr(shell, "codebook", None)
            if isinstance(book, Codebook) and book.codes.numel():
                lo, hi = int(book.codes.min()), int(book.codes.max())
                if lo < 0 or hi >= book.num_clusters:
                    raise CheckpointMismatchError(
                        f"the checkpoint's {role} codes hold values in [{lo}, {hi}] but num_clusters is "
                        f"{book.num_clusters}: every code must lie in [0, {book.num_clusters}) (corrupted checkpoint, "
                        "or a quantization_config that does not belong to these tensors)"
                    )

    def _hf_basis_config_for(self, model: nn.Module) -> dict[str, Any]:
        """The checkpoint's record, with the module names of this model (which may lack the head)."""
        cfg = self.quantization_config
        record = cfg.to_hf_basis_config()
        layers = {}
        emb_name = None
        for saved_name, shell in self._shells.items():  # the input layer first
            role = self._roles[saved_name]
            names = [n for n, _, _ in _all_names(model, shell)]
            info = dict(cfg.layers[saved_name], aliases=names[1:])
            info.pop("shared_tensors", None)  # recomputed from the tensors by attach_quantization_config
            if role == "input":
                emb_name = names[0]
            elif role == "output":
                info["tied_to"] = emb_name if info.get("tied_to") is not None and emb_name is not None else None
            layers[names[0]] = info
        record["layers"] = layers
        if record["modules"] != "embeddings":
            record["modules"] = "both" if len(layers) == 2 else next(iter(layers.values()))["role"]
        record["tied"] = any(info.get("tied_to") for info in layers.values())
        return record

    # ------------------------------------------------------------------ model.dequantize()
    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        from hf_basis.integrations.serialization import decompress

        return decompress(model, dtype=dtype)


def register() -> None:
    """Register HfBasisQuantizer as quant_method "hf_basis" (idempotent: re-importing hf_basis is fine)."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        if AUTO_QUANTIZER_MAPPING[QUANT_METHOD].__name__ != HfBasisQuantizer.__name__:
            raise ValueError(f"another quantizer is already registered as {QUANT_METHOD!r}")
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = HfBasisQuantizer  # a reloaded hf_basis replaces its old class
    else:
        register_quantizer(QUANT_METHOD)(HfBasisQuantizer)
