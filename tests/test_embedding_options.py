"""nn.Embedding / nn.Linear options survive conversion or are refused, never dropped (issue 15, item 5):
max_norm is honoured, frozen layers stay frozen, float64 models compute in float64 (basis) or are refused (quant).
References: nn.Embedding with the same options over the decoded weight, and the dense float64 model itself."""

import copy

import pytest
import torch
from torch import nn

import hf_basis
from hf_basis import BasisEmbedding, BasisLinear, QuantEmbedding
from tiny_models import tiny_model

V = 64
LOSSLESS = {"basis": {"num_basis": 4, "num_clusters": V}, "quant": {"method": "quant", "nbit": 32}}


@pytest.mark.parametrize("method", ["basis", "quant"])
def test_max_norm_rows_are_renormalised_like_nn_embedding(method):
    model = tiny_model("llama", vocab_size=V, tie=False)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        emb.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))  # row norms ~1.7, above max_norm
    emb.max_norm, emb.norm_type = 0.5, 2.0
    hf_basis.convert(model, **LOSSLESS[method])
    converted = model.get_input_embeddings()
    assert converted.max_norm == 0.5
    ids = torch.tensor([[3, 7, 7, 60, 0]])
    reference = nn.Embedding.from_pretrained(converted.weight.detach().float().clone(), max_norm=0.5)
    out = converted(ids)
    torch.testing.assert_close(out, reference(ids))
    assert float(out.detach().norm(dim=-1).max()) <= 0.5 + 1e-6


def test_max_norm_basis_module_other_norm_type():
    dense = nn.Embedding(40, 8, max_norm=1.0, norm_type=1.0)
    with torch.no_grad():
        dense.weight.mul_(0.5)
    emb, _ = BasisEmbedding.from_embedding(dense, num_basis=2, num_clusters=40)
    reference = nn.Embedding.from_pretrained(emb.weight.detach().clone(), max_norm=1.0, norm_type=1.0)
    ids = torch.arange(40)
    torch.testing.assert_close(emb(ids), reference(ids))
    assert "max_norm=1.0" in repr(emb)


def test_gradient_options_of_an_embedding_are_refused_not_dropped():
    model = tiny_model("llama", vocab_size=V, tie=False)
    model.get_input_embeddings().scale_grad_by_freq = True
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        hf_basis.convert(model, num_basis=4, num_clusters=16)
    assert type(model.get_input_embeddings()) is nn.Embedding  # refused before anything was touched


@pytest.mark.parametrize("tie", [False, True])
def test_frozen_layers_stay_frozen(tie):
    model = tiny_model("llama", vocab_size=V, tie=tie)
    model.get_input_embeddings().weight.requires_grad_(False)
    hf_basis.convert(model, num_basis=4, num_clusters=16)
    assert not model.get_input_embeddings().codebook.centroids.requires_grad
    # untied: the head was trainable and stays so; tied: it is the frozen embedding
    assert model.get_output_embeddings().codebook.centroids.requires_grad is not tie


def test_frozen_head_and_bias_stay_frozen():
    linear = nn.Linear(8, 30)
    linear.requires_grad_(False)
    head, _ = BasisLinear.from_linear(linear, num_basis=2, num_clusters=8)
    assert not head.codebook.centroids.requires_grad and not head.bias.requires_grad
    trainable = nn.Linear(8, 30)
    trainable.bias.requires_grad_(False)
    head, _ = BasisLinear.from_linear(trainable, num_basis=2, num_clusters=8)
    assert head.codebook.centroids.requires_grad and not head.bias.requires_grad


def float64_llama() -> nn.Module:
    model = tiny_model("llama", vocab_size=V, tie=False).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # values a float32 cannot hold
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64))
    return model


def test_float64_model_computes_in_float64():
    dense = float64_llama()
    model = hf_basis.convert(copy.deepcopy(dense), **LOSSLESS["basis"])
    ids = torch.tensor([[1, 5, 9, 33, 63, 2]])
    out, ref = model(ids).logits, dense(ids).logits
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-11)
    out.pow(2).mean().backward()
    ref.pow(2).mean().backward()
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(model.get_parameter(name).grad, dense.get_parameter(name).grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("modules", ["both", "output"])
def test_float64_model_is_refused_by_quant(modules):
    model = float64_llama()
    with pytest.raises(ValueError, match="float64.*model.float"):
        hf_basis.convert(model, method="quant", nbit=8, modules=modules)
    assert type(model.get_output_embeddings()) is nn.Linear and type(model.get_input_embeddings()) is nn.Embedding
    with pytest.raises(ValueError, match="float64"):
        QuantEmbedding(V, 32, _weight=torch.randn(V, 32, dtype=torch.float64), nbit=8)
