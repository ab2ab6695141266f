"""PEFT on converted models: LoRA on a compressed embedding, trainable tokens and prompt learning.

PEFT recognises embeddings by type (`isinstance(layer, nn.Embedding)`) and finds a model's word embeddings for prompt
learning through a parameter with one row per token; a compressed embedding has neither. `get_peft_model` and
`load_peft_model` are `peft.get_peft_model` and `PeftModel.from_pretrained` with three additions:

* LoRA (`LoraConfig`) can target a `BasisEmbedding` / `QuantEmbedding` (e.g. `target_modules=["embed_tokens"]`):
  the config gets `CompressedLoraEmbedding` through PEFT's custom-layer registry (`_register_custom_module`). The
  adapter adds `B A` rows to the compressed lookup; it cannot be merged into the codes (`merge_and_unload` raises).
* `trainable_token_indices` / `TrainableTokensConfig` on a compressed embedding (and its tied head): PEFT's
  `TrainableTokensLayer` becomes a `CompressedTrainableTokensLayer`, which overrides the chosen tokens' rows (or
  logits) on top of the compressed layer's output instead of rebuilding the dense matrix.
* prompt learning (prompt tuning with RANDOM / TEXT / SAMPLE_VOCAB init, p-tuning, prefix tuning, ...): while PEFT
  looks for the word embeddings, the compressed input embedding shows it an empty (vocab_size, 0) parameter named
  `weight`, so PEFT picks that module as it picks an nn.Embedding; the parameter is removed right after.

`modules_to_save=["lm_head"]` needs nothing here: the fused loss arms every BasisLinear inside the output layer,
including PEFT's trainable copy (see `hf_basis.integrations.fused_loss`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel, get_peft_model as _peft_get_peft_model
from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import Embedding as LoraEmbedding
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.utils.other import TrainableTokensWrapper, _set_trainable
from torch import nn

from hf_basis.modules.basis_embedding import BasisEmbedding
from hf_basis.modules.basis_linear import BasisLinear
from hf_basis.modules.quant_embedding import QuantEmbedding, QuantLinear

__all__ = ["CompressedLoraEmbedding", "CompressedTrainableTokensLayer", "get_peft_model", "load_peft_model"]

_EMBEDDINGS = (BasisEmbedding, QuantEmbedding)
_HEADS = (BasisLinear, QuantLinear)


class CompressedLoraEmbedding(LoraEmbedding):
    """PEFT's LoRA embedding layer over a BasisEmbedding / QuantEmbedding: output = compressed lookup + (A^T[ids] B^T)
    * scaling. Merging is refused: the codes cannot absorb a low-rank update."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def _embed(self, input: torch.Tensor, weight: torch.Tensor, input_fn=None, output_fn=None) -> torch.Tensor:
        if input_fn is not None or output_fn is not None:
            raise NotImplementedError("tensor-parallel LoRA is not supported on a compressed embedding")
        return F.embedding(input, weight, padding_idx=self.get_base_layer().padding_idx)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise RuntimeError(
            f"a LoRA adapter on a {type(self.get_base_layer()).__name__} cannot be merged into its compressed table; "
            "keep it unmerged (it adds its rows in forward), or dequantize the model before applying LoRA"
        )


class CompressedTrainableTokensLayer(TrainableTokensLayer):
    """PEFT's trainable-tokens layer over a compressed embedding or tied head.

    The chosen tokens' rows come from the adapter; the rest from the compressed layer, without building the dense
    (V, D) matrix: an embedding replaces the looked-up rows of those tokens, a head replaces their logits by
    x @ rows^T (+ their bias).
    """

    def forward_adapters(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or not active_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        self._check_overlapping_tokens(active_adapters)
        base = self.get_base_layer()
        result = base(x, *args, **kwargs)
        for adapter in active_adapters:
            rows = self.trainable_tokens_delta[adapter]  # (n, D)
            index = torch.as_tensor(self.token_indices[adapter], device=result.device)  # (n,)
            if isinstance(base, _EMBEDDINGS):
                slot = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=x.device)
                slot[index.to(x.device)] = torch.arange(len(index), device=x.device)
                picked = slot[x]  # (...,) position in `rows`, -1 for the other tokens
                chosen = rows.to(result.dtype)[picked.clamp(min=0)]  # (..., D)
                result = torch.where((picked >= 0)[..., None], chosen, result)
            else:
                logits = x.to(rows.dtype) @ rows.T  # (..., n)
                if base.bias is not None:
                    logits = logits + base.bias[index].to(logits.dtype)
                result = result.index_copy(-1, index, logits.to(result.dtype))
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise RuntimeError(
            f"trainable tokens on a {type(self.get_base_layer()).__name__} cannot be merged into its compressed "
            "table; keep the adapter unmerged (it replaces those tokens' rows in forward)"
        )


def _register_lora_layers(config: PeftConfig) -> None:
    if isinstance(config, LoraConfig):
        config._register_custom_module({layer: CompressedLoraEmbedding for layer in _EMBEDDINGS})


@contextlib.contextmanager
def _compressed_layers_accepted(model: nn.Module) -> Iterator[None]:
    """For the duration, the compressed input embedding holds an empty (vocab_size, 0) parameter `weight` (PEFT's
    prompt learning takes the module of the first parameter with vocab_size rows as the word embeddings), and PEFT's
    "Unsupported layer type" warning for the compressed layers (handled here) is silenced."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    placeholder = isinstance(emb, _EMBEDDINGS) and "weight" not in emb._parameters
    if placeholder:
        emb._parameters["weight"] = nn.Parameter(torch.empty(emb.num_embeddings, 0), requires_grad=False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Unsupported layer type '<class 'hf_basis\.")
            yield
    finally:
        if placeholder:
            del emb._parameters["weight"]


def _storage(layer: nn.Module) -> nn.Module | None:
    return getattr(layer, "codebook", None) or getattr(layer, "table", None)


def _adapt_trainable_tokens(peft_model: nn.Module, adapter_name: str, inference_mode: bool) -> None:
    """Tie the trainable tokens of a compressed embedding to a head sharing its table, then give every PEFT
    trainable-tokens layer over a compressed layer the forward above."""
    model = peft_model.get_base_model()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (
        isinstance(emb, TrainableTokensWrapper)
        and isinstance(head, _HEADS)
        and _storage(head) is not None
        and _storage(head) is _storage(emb.token_adapter.get_base_layer())
    ):
        # PEFT finds a tied head through `_tied_weights_keys` entries naming a parameter `<head>.weight`; a
        # compressed tied head shares a codebook / table instead, so tie its trainable tokens as PEFT does there.
        head_name = next(name for name, module in model.named_modules() if module is head)
        _set_trainable(
            model, adapter_name, module_names=[head_name], inference_mode=inference_mode, strict_module_check=True,
            wrapper_cls=TrainableTokensWrapper, token_indices=emb.token_adapter.token_indices[adapter_name],
            tied_adapter=emb.token_adapter,
        )  # fmt: skip
    for module in peft_model.modules():
        if type(module) is TrainableTokensLayer and isinstance(module.get_base_layer(), _EMBEDDINGS + _HEADS):
            module.__class__ = CompressedTrainableTokensLayer  # same state; only the forward and merge differ


def get_peft_model(model: nn.Module, peft_config: PeftConfig, *args: Any, **kwargs: Any) -> nn.Module:
    """`peft.get_peft_model` for a model converted by hf_basis (same arguments, same result; see the module docs)."""
    _register_lora_layers(peft_config)
    with _compressed_layers_accepted(model):
        peft_model = _peft_get_peft_model(model, peft_config, *args, **kwargs)
        adapter_name = args[0] if args else kwargs.get("adapter_name", "default")
        _adapt_trainable_tokens(peft_model, adapter_name, peft_config.inference_mode)
    return peft_model


def load_peft_model(model: nn.Module, model_id: str, *args: Any, **kwargs: Any) -> PeftModel:
    """`PeftModel.from_pretrained(model, model_id, ...)` for a model converted by hf_basis (adapters saved from a
    model made by `get_peft_model` above)."""
    config = kwargs.pop("config", None) or PeftConfig.from_pretrained(model_id, **{
        k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if k in kwargs})  # fmt: skip
    _register_lora_layers(config)
    with _compressed_layers_accepted(model):
        peft_model = PeftModel.from_pretrained(model, model_id, *args, config=config, **kwargs)
        adapter_name = args[0] if args else kwargs.get("adapter_name", "default")
        _adapt_trainable_tokens(peft_model, adapter_name, config.inference_mode)
    return peft_model
