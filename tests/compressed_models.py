"""Tiny compressed models for the save / load / push / Trainer tests (tests/integrations/)."""

from __future__ import annotations

import torch
import transformers

import hf_basis
from tiny_models import tiny_model

V, H = 300, 32
BASIS = {"num_basis": 4, "num_clusters": 16}
QUANT = {"method": "quant", "nbit": 4}
SETTINGS = {"basis": BASIS, "quant": QUANT}

# (arch, tied) pairs: GPT-2 and BertForMaskedLM tie their head to the embedding, Llama does not.
ARCHS = [("gpt2", True), ("llama", False), ("bert-mlm", True), ("lstm", True), ("lstm", False)]


def auto_class(arch: str):
    return transformers.AutoModelForMaskedLM if arch.startswith("bert") else transformers.AutoModelForCausalLM


def dense_model(arch: str, tie: bool | None = None, vocab_size: int = V, hidden: int = H) -> torch.nn.Module:
    """A random tiny dense model (eval mode)."""
    if arch == "lstm":
        config = hf_basis.LSTMLMConfig(vocab_size=vocab_size, emsize=hidden, nhid=hidden, nlayers=1,
                                       tie_word_embeddings=bool(tie))  # fmt: skip
        return hf_basis.LSTMLMForCausalLM(config).eval()
    return tiny_model(arch, vocab_size, hidden, tie=tie)


def compressed_model(arch: str, method: str = "basis", tie: bool | None = None, **kwargs) -> torch.nn.Module:
    model = dense_model(arch, tie, **kwargs)
    hf_basis.convert(model, **SETTINGS[method])
    return model


def inputs(vocab_size: int = V, batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def storage(module: torch.nn.Module) -> torch.nn.Module:
    """The Codebook / QuantizedTable of a compressed layer."""
    return module.codebook if hasattr(module, "codebook") else module.table
