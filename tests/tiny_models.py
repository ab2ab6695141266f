"""Tiny random transformers models, built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
import transformers


def tiny_model(arch: str, vocab_size: int = 300, hidden: int = 32, tie: bool | None = None) -> torch.nn.Module:
    """A randomly initialised tiny model of the given architecture, in eval mode."""
    common = {"vocab_size": vocab_size}
    if tie is not None:
        common["tie_word_embeddings"] = tie
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=hidden, n_layer=1, n_head=2, n_positions=64, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                       **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                       **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "bert":
        cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=2 * hidden, max_position_embeddings=64, **common)
        model = transformers.BertModel(cfg)
    elif arch == "bert-mlm":
        cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=2 * hidden, max_position_embeddings=64, **common)
        model = transformers.BertForMaskedLM(cfg)
    elif arch == "t5":
        cfg = transformers.T5Config(d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=1, num_heads=2,
                                    decoder_start_token_id=0, **common)
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def model_inputs(arch: str, vocab_size: int = 300, batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}
