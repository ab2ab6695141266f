"""convert / report / quantize_embed on tiny random transformers models of several architectures."""

import copy
import json

import pytest
import torch
from torch import nn

import hf_basis
from hf_basis import BasisEmbedding, BasisLinear, QuantEmbedding, QuantLinear
from tiny_models import model_inputs, tiny_model

V, H = 300, 32


def unique_param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates shared tensors


def float_vxh_tensors(model: nn.Module) -> list[str]:
    return [k for k, t in model.state_dict().items() if t.is_floating_point() and t.numel() >= V * H]


# (arch, modules, tied?) — BERT base has no output layer; BertForMaskedLM and T5 tie their head to the embedding.
CASES = [
    ("gpt2", "both", True),
    ("llama", "both", False),
    ("qwen2", "both", False),
    ("bert", "input", False),
    ("bert-mlm", "both", True),
    ("t5", "both", True),
]


@pytest.mark.parametrize("arch, modules, tied", CASES)
def test_basis_convert_changes_param_count_as_predicted(arch, modules, tied):
    model = tiny_model(arch, V, H, tie=False if arch in ("llama", "qwen2") else None)
    inputs = model_inputs(arch, V)
    before = unique_param_count(model)
    B, K = 4, 16
    hf_basis.convert(model, num_basis=B, num_clusters=K, modules=modules)
    n_matrices = 1 if (modules == "input" or tied) else 2
    # Each dense V x H matrix is replaced by centroids B x K x H/B; biases are kept.
    assert unique_param_count(model) == before - n_matrices * (V * H - K * H)
    assert float_vxh_tensors(model) == []
    emb = model.get_input_embeddings()
    assert isinstance(emb, BasisEmbedding)
    if modules == "both":
        head = model.get_output_embeddings()
        assert isinstance(head, BasisLinear)
        assert (head.codebook is emb.codebook) == tied
    assert model.hf_basis_config["tied"] == tied
    json.dumps(model.hf_basis_config)  # JSON-serialisable
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out[0] if isinstance(out, tuple) else next(iter(out.values()))).all()


def test_t5_shared_embedding_replaced_everywhere():
    model = tiny_model("t5", V, H)
    hf_basis.convert(model, num_basis=4, num_clusters=16)
    assert model.shared is model.encoder.embed_tokens is model.decoder.embed_tokens
    assert model.lm_head.codebook is model.shared.codebook
    layer = model.hf_basis_config["layers"]["shared"]
    assert set(layer["aliases"]) == {"encoder.embed_tokens", "decoder.embed_tokens"}


def test_converted_model_tracks_dense_model_with_many_clusters():
    """With K close to V the PQ is nearly lossless, so logits stay close to the dense model's."""
    model = tiny_model("llama", V, H, tie=False)
    ids = model_inputs("llama", V)["input_ids"]
    with torch.no_grad():
        dense_logits = model(ids).logits
    hf_basis.convert(model, num_basis=16, num_clusters=V)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-3)
    for layer in model.hf_basis_config["layers"].values():
        assert layer["relative_error"] < 1e-3


def test_tied_gpt2_stays_tied_and_trains():
    model = tiny_model("gpt2", V, H)
    hf_basis.convert(model, num_basis=4, num_clusters=16)
    emb, head = model.transformer.wte, model.lm_head
    assert emb.codebook is head.codebook
    model.train()
    ids = model_inputs("gpt2", V)["input_ids"]
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert emb.codebook.centroids.grad is not None and emb.codebook.centroids.grad.abs().sum() > 0
    moved = model.to(torch.float64)
    assert moved.transformer.wte.codebook is moved.lm_head.codebook
    assert moved.lm_head.codebook.codes.dtype == torch.uint8
    keys = model.all_tied_weights_keys
    assert keys == {
        "lm_head.codebook.codes": "transformer.wte.codebook.codes",
        "lm_head.codebook.centroids": "transformer.wte.codebook.centroids",
    }


@pytest.mark.parametrize("nbit", [2, 4])
def test_quant_convert_tied_shares_storage_and_has_no_float_matrix(nbit):
    model = tiny_model("gpt2", V, H)
    hf_basis.convert(model, method="quant", nbit=nbit)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert emb.table is head.table
    assert float_vxh_tensors(model) == []
    assert emb.table.packed.shape == (V, (H * nbit + 7) // 8)


def test_report_lists_ratios_and_errors():
    model = tiny_model("llama", V, H, tie=False)
    hf_basis.convert(model, num_basis=4, num_clusters=16)
    rep = hf_basis.report(model)
    assert [layer.name for layer in rep.layers] == ["model.embed_tokens", "lm_head"]
    # Independent arithmetic: dense fp32 V x H; codes uint8 V x 4; centroids fp32 4 x 16 x 8.
    expected_after = V * 4 + 4 * 16 * 8 * 4
    for layer in rep.layers:
        assert layer.bytes_before == V * H * 4
        assert layer.bytes_after == expected_after
        assert 0 < layer.relative_error < 1
    assert rep.compression_ratio == pytest.approx(2 * V * H * 4 / (2 * expected_after))
    text = str(rep)
    assert "model.embed_tokens" in text and "lm_head" in text and "BasisLinear" in text and "total" in text


def test_report_counts_tied_storage_once():
    model = tiny_model("gpt2", V, H)
    hf_basis.convert(model, num_basis=4, num_clusters=16)
    rep = hf_basis.report(model)
    assert rep.bytes_before == V * H * 4
    assert rep.bytes_after == V * 4 + 4 * 16 * 8 * 4
    assert rep.layers[1].tied_to == "transformer.wte"


def test_report_on_unconverted_model_errors():
    with pytest.raises(ValueError, match="convert"):
        hf_basis.report(tiny_model("gpt2", V, H))


# ---- bad input: clear errors, and the model is left exactly as it was -------------------------------------------


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()}


def assert_convert_refused(model, kwargs, match, exc=ValueError):
    """convert(model, num_basis=4, num_clusters=16, **kwargs) raises `exc` and leaves the model exactly as it was."""
    state, types = snapshot(model)
    with pytest.raises(exc, match=match):
        hf_basis.convert(model, **({"num_basis": 4, "num_clusters": 16} | kwargs))
    after_state, after_types = snapshot(model)
    assert after_types == types
    assert all(torch.equal(state[k], after_state[k]) for k in state)
    assert not hasattr(model, "hf_basis_config")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"num_basis": 5}, ValueError, r"num_basis=5 does not divide the hidden size 32.*\[1, 2, 4, 8, 16, 32\]"),
        ({"num_clusters": 1}, ValueError, r"num_clusters must be an integer in \[2, 300\]"),
        ({"num_clusters": 301}, ValueError, r"num_clusters must be an integer in \[2, 300\]"),
        ({"method": "quant", "nbit": 3}, ValueError, r"nbit must be one of \[1, 2, 4, 8, 16, 32\]"),
        ({"method": "kmeans"}, ValueError, r"method must be one of \['basis', 'quant'\]"),
        ({"modules": "head"}, ValueError, r"modules must be one of \['both', 'input', 'output'\]"),
    ],
)
def test_bad_arguments_leave_model_untouched(kwargs, exc, match):
    model = tiny_model("llama", V, H, tie=False)
    assert_convert_refused(model, kwargs, match, exc)


@pytest.mark.parametrize("tie", [False, True])
def test_token_frequencies_weight_the_basis_kmeans(tie):
    counts = torch.randint(0, 50, (V,), generator=torch.Generator().manual_seed(0))
    counts[:10] = 5000  # a few very frequent tokens
    dense = tiny_model("gpt2", V, H, tie=tie)
    weighted = hf_basis.convert(copy.deepcopy(dense), num_basis=4, num_clusters=16, token_frequencies=counts)
    plain = hf_basis.convert(copy.deepcopy(dense), num_basis=4, num_clusters=16)
    assert weighted.hf_basis_config["token_frequency_weighted"] is True
    assert plain.hf_basis_config["token_frequency_weighted"] is False
    json.dumps(weighted.hf_basis_config)
    emb, head = weighted.get_input_embeddings(), weighted.get_output_embeddings()
    assert (head.codebook is emb.codebook) == tie
    # both layers were fitted with the weights: the frequent rows are reconstructed better than without them
    for dense_layer, w_layer, p_layer in (
        (dense.get_input_embeddings(), emb, plain.get_input_embeddings()),
        (dense.get_output_embeddings(), head, plain.get_output_embeddings()),
    ):
        ref = dense_layer.weight.detach()[:10]
        err_w = (w_layer.codebook.decode().detach()[:10] - ref).norm()
        err_p = (p_layer.codebook.decode().detach()[:10] - ref).norm()
        assert err_w < err_p
    # a sequence of probabilities is accepted too
    probs = (counts / counts.sum()).tolist()
    llama = tiny_model("llama", V, H, tie=False)
    model = hf_basis.convert(llama, num_basis=4, num_clusters=16, token_frequencies=probs)
    assert model.hf_basis_config["token_frequency_weighted"] is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "quant", "token_frequencies": torch.ones(V)}, r'token_frequencies applies to method="basis"'),
        ({"token_frequencies": torch.ones(V - 1)}, rf"token_frequencies must be 1-D of length {V}"),
        ({"token_frequencies": torch.ones(V, 2)}, rf"token_frequencies must be 1-D of length {V}"),
        ({"token_frequencies": -torch.ones(V)}, "token_frequencies must be non-negative"),
        ({"token_frequencies": torch.zeros(V)}, "token_frequencies is all zero"),
        ({"token_frequencies": torch.full((V,), float("nan"))}, "token_frequencies contains NaN"),
    ],
)
def test_bad_token_frequencies_leave_model_untouched(kwargs, match):
    model = tiny_model("llama", V, H, tie=False)
    assert_convert_refused(model, kwargs, match)


def test_head_input_moment_fits_the_head_to_its_inputs():
    """With the moment of the head's real inputs, the decoded head's mean-square logit error on those inputs is
    lower than plain k-means' (computed densely here), and only the output layer changes."""
    dense = tiny_model("llama", V, H, tie=False)
    batches = [torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    moment = hf_basis.head_input_moment(dense, batches)
    aware = hf_basis.convert(copy.deepcopy(dense), num_basis=4, num_clusters=16, modules="output",
                             head_input_moment=moment)
    plain = hf_basis.convert(copy.deepcopy(dense), num_basis=4, num_clusters=16, modules="output")
    assert aware.hf_basis_config["activation_aware"] is True and plain.hf_basis_config["activation_aware"] is False
    json.dumps(aware.hf_basis_config)
    round_trip = hf_basis.BasisConfig.from_hf_basis_config(aware.hf_basis_config).to_hf_basis_config()
    assert round_trip["activation_aware"] is True  # kept in config.json's quantization_config
    with torch.no_grad():
        hidden = torch.cat([dense.model(ids).last_hidden_state.reshape(-1, H) for ids in batches])
        W = dense.lm_head.weight

        def logit_mse(model):
            return float((hidden @ (W - model.lm_head.codebook.decode()).T).square().mean())

        assert logit_mse(aware) < 0.9 * logit_mse(plain)
    assert isinstance(aware.get_input_embeddings(), nn.Embedding)


@pytest.mark.parametrize(
    "kwargs, tie, match",
    [
        ({"head_input_moment": torch.eye(H), "method": "quant"}, False, r'head_input_moment applies to method="basis"'),
        ({"head_input_moment": torch.eye(H), "modules": "input"}, False, "applies to the output layer"),
        ({"head_input_moment": torch.eye(H)}, True, "needs an untied output layer"),
        ({"head_input_moment": torch.eye(H + 1)}, False, rf"must be \({H}, {H}\)"),
        ({"head_input_moment": torch.full((H, H), float("nan"))}, False, "NaN or infinite"),
        ({"head_input_moment": torch.eye(H).long()}, False, "real floating-point tensor"),
    ],
)
def test_bad_head_input_moment_leaves_model_untouched(kwargs, tie, match):
    model = tiny_model("gpt2", V, H, tie=tie)
    assert_convert_refused(model, kwargs, match)


def test_missing_output_module_errors():
    with pytest.raises(ValueError, match="no output embeddings.*modules='input'"):
        hf_basis.convert(tiny_model("bert", V, H), num_basis=4, num_clusters=16)


def test_converting_twice_errors():
    model = hf_basis.convert(tiny_model("llama", V, H, tie=False), num_basis=4, num_clusters=16)
    with pytest.raises(ValueError, match="already a BasisEmbedding"):
        hf_basis.convert(model, num_basis=4, num_clusters=16)


def test_model_without_accessors_errors():
    with pytest.raises(TypeError, match="get_input_embeddings"):
        hf_basis.convert(nn.Sequential(nn.Embedding(10, 4)))


def test_quantize_embed_replaces_every_embedding_and_keeps_tie():
    model = tiny_model("gpt2", V, H)
    hf_basis.quantize_embed(model, nbit=2)
    assert isinstance(model.transformer.wte, QuantEmbedding)
    assert isinstance(model.transformer.wpe, QuantEmbedding)  # position embeddings are nn.Embedding too
    assert not any(type(m) is nn.Embedding for m in model.modules())
    ids = model_inputs("gpt2", V)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
