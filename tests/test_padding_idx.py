"""padding_idx keeps nn.Embedding's meaning after conversion: the row's value is returned, only its gradient stops
(issue 15, item 1). A Llama whose pad id (1) has a non-zero row, converted losslessly, against the dense model."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_basis
from tiny_models import tiny_model

V = 64
LOSSLESS = {"basis": {"num_basis": 4, "num_clusters": V}, "quant": {"method": "quant", "nbit": 32}}


def llama_with_pad_row(tie: bool) -> torch.nn.Module:
    model = tiny_model("llama", vocab_size=V, tie=tie)
    model.config.pad_token_id = 1
    emb = model.get_input_embeddings()
    emb.padding_idx = 1
    with torch.no_grad():
        emb.weight[1] = torch.randn(emb.embedding_dim, generator=torch.Generator().manual_seed(3))  # a trained [PAD]
    return model


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("method", ["basis", "quant"])
def test_lossless_conversion_keeps_the_pad_row(tmp_path, method, tie):
    dense = llama_with_pad_row(tie)
    ids = torch.tensor([[5, 1, 1, 9, 1, 30]])
    with torch.no_grad():
        expected = dense(ids).logits
    model = hf_basis.convert(copy.deepcopy(dense), **LOSSLESS[method])
    emb = model.get_input_embeddings()
    assert emb.padding_idx == 1
    torch.testing.assert_close(emb.weight, dense.get_input_embeddings().weight.detach(), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded.dequantize()  # the dense layers hold the row the compressed model returned
    assert type(loaded.get_input_embeddings()) is torch.nn.Embedding
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
