"""`model.resize_token_embeddings` on converted models, against the same call on the dense model.

The dense model resized by transformers is the reference: kept rows must be unchanged, added rows must be the rows
transformers adds (the mean row with `mean_resizing=True`) compressed with the layer's existing codebook / level
table, ties and the head's bias must follow as they do for the dense model, and the result must save and reload.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import hf_basis
from tiny_models import tiny_model

V, H, B, K = 300, 32, 4, 16


def convert(model, method):
    kwargs = {"num_basis": B, "num_clusters": K} if method == "basis" else {"method": "quant", "nbit": 4}
    return hf_basis.convert(model, **kwargs)


def nearest_centroid_rows(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each sub-vector of `rows` replaced by its nearest centroid, by brute force."""
    d = centroids.shape[-1]
    out = []
    for row in rows:
        parts = []
        for b in range(centroids.shape[0]):
            sub = row[b * d:(b + 1) * d]
            parts.append(centroids[b, (centroids[b] - sub).square().sum(-1).argmin()])
        out.append(torch.cat(parts))
    return torch.stack(out)


def nearest_level_rows(rows: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return levels[(rows[..., None] - levels).abs().argmin(-1)]


@pytest.mark.parametrize("method", ["basis", "quant"])
@pytest.mark.parametrize("tie", [True, False])
def test_growing_adds_the_compressed_mean_rows_keeps_the_rest_and_reloads(tmp_path, method, tie):
    dense = tiny_model("llama", vocab_size=V, hidden=H, tie=tie)
    model = convert(copy.deepcopy(dense), method)
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    old_rows = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()

    returned = model.resize_token_embeddings(310)
    dense.resize_token_embeddings(310)

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert returned is emb and model.config.vocab_size == 310 == dense.config.vocab_size
    assert emb.num_embeddings == head.out_features == 310 and emb.weight.shape == head.weight.shape == (310, H)
    torch.testing.assert_close(emb.weight[:V], old_rows, rtol=0, atol=0)
    torch.testing.assert_close(head.weight[:V], old_head, rtol=0, atol=0)
    pairs = ((emb, dense.get_input_embeddings(), old_rows), (head, dense.get_output_embeddings(), old_head))
    for layer, dense_layer, old in pairs:
        # transformers' added rows (the mean row up to 1e-9 of the covariance) are the mean of the old rows; the
        # compressed layer's added rows must be those, compressed with its unchanged codebook / levels.
        torch.testing.assert_close(dense_layer.weight[V:].detach(), old.mean(0).expand(10, H), rtol=0, atol=1e-3)
        if method == "basis":
            expected = nearest_centroid_rows(old.mean(0, keepdim=True), layer.codebook.centroids.detach())
        else:
            expected = nearest_level_rows(old.mean(0, keepdim=True), layer.table.levels)
        torch.testing.assert_close(layer.weight[V:].detach(), expected.expand(10, H), rtol=0, atol=0)
    if tie:
        assert (head.codebook is emb.codebook) if method == "basis" else (head.table is emb.table)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after[..., :V], before, rtol=0, atol=0)  # every old logit is unchanged

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.vocab_size == 310
    assert [info["shape"] for info in loaded.config.quantization_config.layers.values()] == [[310, H]] * 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, after, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["basis", "quant"])
def test_pad_to_multiple_of_and_shrinking(tmp_path, method):
    model = convert(tiny_model("llama", vocab_size=V, hidden=H, tie=False), method)
    ids = torch.randint(0, 250, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.resize_token_embeddings(301, pad_to_multiple_of=64)
    assert model.config.vocab_size == 320 and model.get_output_embeddings().out_features == 320
    model.resize_token_embeddings(250)  # drops the last rows
    assert model.config.vocab_size == 250
    assert model.get_input_embeddings().weight.shape == model.get_output_embeddings().weight.shape == (250, H)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before[..., :250], rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=ids).logits
    torch.testing.assert_close(reloaded, after, rtol=0, atol=0)


def test_tied_head_bias_follows_like_the_dense_model(tmp_path):
    # BERT's MLM head: tied decoder with a bias that is also `cls.predictions.bias`.
    dense = tiny_model("bert-mlm", vocab_size=V, hidden=H)
    with torch.no_grad():
        dense.cls.predictions.bias.normal_()
    model = convert(copy.deepcopy(dense), "basis")
    model.resize_token_embeddings(310)
    dense.resize_token_embeddings(310)
    head = model.get_output_embeddings()
    torch.testing.assert_close(head.bias, dense.get_output_embeddings().bias, rtol=0, atol=0)
    assert model.cls.predictions.bias is head.bias
    ids = torch.randint(0, 310, (2, 7))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForMaskedLM.from_pretrained(tmp_path)(input_ids=ids).logits, after,
                                   rtol=0, atol=0)  # fmt: skip


def test_mean_resizing_false_uses_the_models_init_and_keeps_old_rows():
    model = convert(tiny_model("llama", vocab_size=V, hidden=H, tie=False), "basis")
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(340, mean_resizing=False)
    emb = model.get_input_embeddings()
    torch.testing.assert_close(emb.weight[:V], old, rtol=0, atol=0)
    # N(0, initializer_range) rows are not all alike: several distinct code rows among the 40 new ones.
    assert len({tuple(row.tolist()) for row in emb.codebook.codes[V:]}) > 1


def test_shrinking_a_basis_codebook_below_its_clusters_is_refused_untouched():
    model = convert(tiny_model("llama", vocab_size=V, hidden=H, tie=True), "basis")
    codes = model.get_input_embeddings().codebook.codes.clone()
    with pytest.raises(ValueError, match=f"integer >= {K}"):
        model.resize_token_embeddings(K - 1)
    assert model.config.vocab_size == V and torch.equal(model.get_input_embeddings().codebook.codes, codes)
    assert model.hf_basis_config["layers"]["model.embed_tokens"]["shape"] == [V, H]
