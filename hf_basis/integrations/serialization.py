"""Saving compressed models the transformers way: quantization_config, tied-tensor names, atomic save, model card.

`attach_quantization_config(model)` is called by `hf_basis.convert` (and after `from_pretrained`). It

* sets `model.config.quantization_config` to a `BasisConfig`, so `save_pretrained` writes it into config.json;
* declares which compressed tensors are the same tensor under several names (a tied head's table, T5's alias
  names), in `model.all_tied_weights_keys` and, as exact-name patterns, in the instance's `_tied_weights_keys`
  (transformers dedups shared tensors on save only for names matching `_tied_weights_keys` patterns);
* gives the model instance its own `save_pretrained` (atomic, writes the model card) and `push_to_hub`
  (one commit with the model card merged into the Hub's README).
"""

from __future__ import annotations

import os
import re
import shutil
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_basis.integrations.config import BasisConfig
from hf_basis.integrations.record import COMPRESSED_MODULES, get_record, replace_module, storage_attr

__all__ = ["attach_quantization_config", "atomic_directory_write", "decompress", "dequantize", "save_pretrained"]

# Weight files a new save replaces: files of an earlier save with other shard names must not survive it.
_WEIGHT_FILE = re.compile(r"^(?:model|pytorch_model|adapter_model)\b.*\.(?:safetensors|bin)(?:\.index\.json)?$")


def attach_quantization_config(model: nn.Module) -> BasisConfig:
    """Make `model` (converted or loaded by hf_basis) save, reload and push as an hf_basis checkpoint.

    Reads `model.hf_basis_config` (adding to each layer the `shared_tensors` it finds, see below); returns the
    BasisConfig it set as `model.config.quantization_config`.
    """
    record = get_record(model)
    if not record:
        raise ValueError("model has no hf_basis_config: call hf_basis.convert(model, ...) first")
    _declare_tied_tensors(model, record["layers"])
    cfg = BasisConfig.from_hf_basis_config(record)
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_config = cfg
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == cfg.quant_method:
        quantizer.quantization_config = cfg
    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.dequantize = types.MethodType(dequantize, model)
    from hf_basis.integrations.hub import push_to_hub

    model.push_to_hub = types.MethodType(push_to_hub, model)
    return cfg


def _declare_tied_tensors(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Name, once, every compressed tensor that is reachable under several names.

    * an alias of a layer (T5's encoder/decoder embed_tokens = shared): all its tensors -> the layer's;
    * a tied head: its Codebook / QuantizedTable tensors -> the embedding's;
    * a tensor of a compressed layer that shares storage with a tensor outside it (BERT's decoder.bias is
      cls.predictions.bias): -> that tensor; recorded in the layer's `shared_tensors` so that loading can share
      it again.

    The {target: source} map goes to `model.all_tied_weights_keys` and, as exact-name patterns, to the instance's
    `_tied_weights_keys`: transformers' save_pretrained keeps one copy of shared tensors only for target names
    matching those patterns (and refuses to save otherwise). The model's own ties between tensors that are still one
    tensor stay declared: a partial conversion leaves them dense (T5's embed_tokens / shared).
    """
    state = model.state_dict(keep_vars=True)
    by_storage: dict[tuple, list[str]] = {}
    for key, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta" and tensor.numel():
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
            by_storage.setdefault(ident, []).append(key)
    tied: dict[str, str] = {}
    for name, info in layers.items():
        module = model.get_submodule(name)
        storage = storage_attr(module)
        owned = {name, *(info.get("aliases") or [])}
        for alias in info.get("aliases") or []:
            tied.update({f"{alias}.{k}": f"{name}.{k}" for k in module.state_dict(keep_vars=True)})
        source = info.get("tied_to")
        if source:
            for k in getattr(module, storage).state_dict(keep_vars=True):
                tied[f"{name}.{storage}.{k}"] = f"{source}.{storage}.{k}"
        shared = {}
        for k, tensor in module.state_dict(keep_vars=True).items():
            if k.startswith(storage + ".") or tensor.device.type == "meta" or not tensor.numel():
                continue
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
            others = sorted(n for n in by_storage.get(ident, []) if not any(n.startswith(o + ".") for o in owned))
            if others:
                shared[k] = others[0]
                tied[f"{name}.{k}"] = others[0]
        if shared:
            info["shared_tensors"] = shared
        else:
            info.pop("shared_tensors", None)
    dense_ties = {
        t: s for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items()
        if t in state and s in state and state[t] is state[s]
    }  # fmt: skip
    tied = dense_ties | tied
    model.all_tied_weights_keys = tied
    model._tied_weights_keys = {f"^{re.escape(t)}$": f"^{re.escape(s)}$" for t, s in tied.items()}
    # The same names, for save_pretrained to leave out and for Trainer's resume to accept as "missing": it then
    # calls tie_weights() instead of warning about missing keys.
    model.__dict__.pop("_keys_to_ignore_on_save", None)
    model._keys_to_ignore_on_save = sorted(set(getattr(model, "_keys_to_ignore_on_save", None) or []) | set(tied))


# ---------------------------------------------------------------------------------------------------------- saving
def _link_or_copy(src: Path, dst: Path) -> None:
    def one(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, copy_function=one, symlinks=True)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        one(os.fspath(src), os.fspath(dst))


def _working_directory_inside(folder: Path) -> bool:
    """Whether the process's working directory is `folder` or inside it; False when it no longer exists (a save
    to an absolute path must not depend on the launch folder of a long job still being there)."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        return False
    return Path(cwd).resolve().is_relative_to(folder)


def atomic_directory_write(save_directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(staging_dir)` into a fresh folder beside `save_directory`, then move it into place.

    If `write` raises, `save_directory` is left exactly as it was (and the staging folder is removed). If the
    folder already exists, the files the new write does not produce (tokenizer files, training state, ...) are
    carried over, except weight files of an earlier save; the old folder is renamed aside, the new one renamed
    in, and the old one deleted, so at every moment one complete copy exists under a known name. (When the folder
    is, or contains, the working directory, it cannot be renamed away: its files are replaced one by one instead,
    each replacement atomic.)
    """
    target = Path(save_directory).resolve()
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: the folder gets the umask's permissions (0755 usually), as transformers' own saves
    # do, instead of mkdtemp's 0700 that other users of a shared machine cannot read.
    staging = parent / f".{target.name}.hf_basis-tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        write(staging)
        if not target.exists():
            os.replace(staging, target)
            return target
        if _working_directory_inside(target):
            # Renaming the working directory away would strand the process in a deleted folder: replace the files
            # one by one instead (each replacement is atomic; stale weight files of an earlier save go last).
            written = {item.name for item in staging.iterdir()}
            for name in sorted(written):
                if (target / name).is_dir() and not (target / name).is_symlink():
                    shutil.rmtree(target / name)
                os.replace(staging / name, target / name)
            for item in target.iterdir():
                if _WEIGHT_FILE.match(item.name) and item.name not in written:
                    item.unlink()
            staging.rmdir()
            return target
        for item in target.iterdir():
            if os.path.lexists(staging / item.name) or _WEIGHT_FILE.match(item.name):
                continue
            _link_or_copy(item, staging / item.name)
        backup = parent / f".{target.name}.hf_basis-old-{uuid.uuid4().hex[:8]}"
        os.replace(target, backup)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return target
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """`PreTrainedModel.save_pretrained` for hf_basis models: the same arguments and files, plus

    * atomicity: everything is written to a temporary folder beside `save_directory` and renamed into place only
      once complete; a failure leaves `save_directory` as it was;
    * README.md: the hf_basis model card (method, settings, compression table, how to load), merged into an
      existing README's text;
    * `push_to_hub=True` pushes the saved folder in one commit (see `push_to_hub`).
    """
    cls_save = type(self).save_pretrained
    is_main = args[0] if args else kwargs.get("is_main_process", True)
    if (
        not is_main
        or kwargs.get("distributed_checkpoint")
        or os.path.isfile(save_directory)
        or (hasattr(self, "should_save_on_this_rank") and not self.should_save_on_this_rank(is_main))
    ):
        return cls_save(self, save_directory, *args, **kwargs)
    push = kwargs.pop("push_to_hub", False)
    hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private") if k in kwargs}
    token = kwargs.get("token")

    def write(staging: Path) -> None:
        from hf_basis.integrations.model_card import merge_model_card

        cls_save(self, staging, *args, **kwargs)
        readme = Path(save_directory) / "README.md"
        existing = readme.read_text(encoding="utf-8") if readme.is_file() else None
        (staging / "README.md").write_text(merge_model_card(existing, self), encoding="utf-8")

    target = atomic_directory_write(save_directory, write)
    if push:
        from hf_basis.integrations.hub import push_folder

        repo_id = hub_kwargs.pop("repo_id", target.name)
        push_folder(target, repo_id, token=token, model=self, **hub_kwargs)


# ---------------------------------------------------------------------------------------------------------- undo
def decompress(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every hf_basis module by a dense nn.Embedding / nn.Linear holding its decoded weight, in place.

    Tied layers share one dense Parameter again. Used by `model.dequantize()`.
    """
    from hf_basis.integrations.fused_loss import uninstall_fused_loss

    uninstall_fused_loss(model)
    found = [m for m in model.modules() if isinstance(m, COMPRESSED_MODULES)]
    dense_weights: dict[int, nn.Parameter] = {}
    for module in found:
        storage = getattr(module, storage_attr(module))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        target = dtype or (storage.centroids.dtype if hasattr(storage, "centroids") else torch.float32)
        if id(storage) not in dense_weights:
            with torch.no_grad():
                w = storage.decode() if hasattr(storage, "decode") else storage.dequantize(torch.float32)
            dense_weights[id(storage)] = nn.Parameter(w.detach().to(target).clone())
        weight = dense_weights[id(storage)]
        if hasattr(module, "num_embeddings"):
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                               max_norm=module.max_norm, norm_type=module.norm_type, device="meta")  # fmt: skip
        else:
            bias = getattr(module, "bias", None)
            new = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
            if bias is not None:
                new.bias = bias if isinstance(bias, nn.Parameter) and bias.dtype == target else nn.Parameter(
                    bias.detach().to(target).clone())
        new.weight = weight
        replace_module(model, module, new)
    for attr in ("hf_basis_config", "save_pretrained", "push_to_hub", "dequantize", "_tied_weights_keys",
                 "_keys_to_ignore_on_save"):  # fmt: skip
        model.__dict__.pop(attr, None)
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)
    return model


def dequantize(self: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """`model.dequantize()` for hf_basis models, loaded or converted in this process: dense layers again (see
    `decompress`), no quantization_config left; returns the model."""
    quantizer = getattr(self, "hf_quantizer", None)
    if quantizer is not None:  # loaded: transformers' own path (its default dtype, then drops the quantizer)
        self.__dict__.pop("dequantize", None)
        return type(self).dequantize(self, dtype=dtype)
    decompress(self, dtype=dtype)
    config = getattr(self, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    return self
