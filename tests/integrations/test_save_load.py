"""save_pretrained / from_pretrained of compressed models through transformers' own entry points (issue 5, point 1)."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM

import hf_basis
from compressed_models import ARCHS, BASIS, H, V, auto_class, compressed_model, dense_model, inputs, logits, storage
from hf_basis import BasisEmbedding, BasisLinear, QuantEmbedding, QuantLinear

KINDS = {"basis": (BasisEmbedding, BasisLinear), "quant": (QuantEmbedding, QuantLinear)}


def header(path: str) -> dict[str, tuple[str, list[int]]]:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("method", ["basis", "quant"])
@pytest.mark.parametrize("arch, tie", ARCHS)
def test_round_trip_is_bit_identical_and_tied(tmp_path, arch, tie, method):
    model = compressed_model(arch, method, tie)
    ids = inputs()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "hf_basis" and qc["method"] == method and qc["tied"] == tie
    assert sorted(info["role"] for info in qc["layers"].values()) == ["input", "output"]
    # Integer codes / packed values are integer tensors; every compressed tensor is stored once.
    tensors = header(tmp_path)
    ints = {k: dt for k, (dt, _) in tensors.items() if k.endswith((".codes", ".packed"))}
    assert ints and set(ints.values()) == {"U8"}
    assert len(ints) == (1 if tie else 2)
    assert not any(k.endswith(".weight") and shape == [V, H] for k, (_, shape) in tensors.items())

    loaded, info = auto_class(arch).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    emb, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert isinstance(emb, KINDS[method][0]) and isinstance(head, KINDS[method][1])
    assert (storage(emb) is storage(head)) == tie
    assert loaded.is_quantized and loaded.hf_basis_config["tied"] == tie
    assert torch.equal(logits(loaded, ids), expected)

    # Saving the loaded model again writes the same tensors.
    loaded.save_pretrained(tmp_path / "again")
    assert header(tmp_path / "again") == tensors


@pytest.mark.parametrize("method", ["basis", "quant"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_applies_to_floats_only(tmp_path, dtype, method):
    compressed_model("gpt2", method, tie=True).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    emb = model.get_input_embeddings()
    for name, tensor in storage(emb).state_dict().items():
        if name in ("codes", "packed"):
            assert tensor.dtype == torch.uint8, name
        elif method == "basis":
            assert tensor.dtype == dtype, name
        else:
            assert tensor.dtype == torch.float32, name  # SmallFry level tables stay exact float32 by design
    assert model.transformer.h[0].attn.c_attn.weight.dtype == dtype
    assert logits(model, inputs()).dtype == dtype


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map(tmp_path, device_map):
    model = compressed_model("llama", "basis", tie=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(logits(loaded, inputs()), logits(model, inputs()))


def test_base_model_from_head_checkpoint(tmp_path):
    """AutoModel on a BertForMaskedLM checkpoint: the compressed embedding loads, the head is left out."""
    model = compressed_model("bert-mlm", "basis", tie=True)
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__ == "BertModel"
    assert isinstance(base.get_input_embeddings(), BasisEmbedding)
    assert base.hf_basis_config["modules"] == "input"
    assert list(base.hf_basis_config["layers"]) == ["embeddings.word_embeddings"]
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, model.bert(ids).last_hidden_state)
    base.save_pretrained(tmp_path / "base")
    again = AutoModel.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        assert torch.equal(again(ids).last_hidden_state, model.bert(ids).last_hidden_state)


@pytest.mark.parametrize("modules", ["input", "output"])
def test_one_side_compressed_keeps_the_other_dense(tmp_path, modules):
    model = dense_model("gpt2", tie=True)
    hf_basis.convert(model, **BASIS, modules=modules)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    compressed = loaded.get_input_embeddings() if modules == "input" else loaded.get_output_embeddings()
    dense = loaded.get_output_embeddings() if modules == "input" else loaded.get_input_embeddings()
    assert isinstance(compressed, (BasisEmbedding, BasisLinear))
    assert type(dense) in (torch.nn.Linear, torch.nn.Embedding)
    assert torch.equal(logits(loaded, inputs()), logits(model, inputs()))


@pytest.mark.parametrize("method", ["basis", "quant"])
def test_compress_while_loading(tmp_path, method):
    """from_pretrained(dense_dir, quantization_config=BasisConfig(...)) == load dense, then convert()."""
    dense = dense_model("gpt2", tie=True)
    dense.save_pretrained(tmp_path / "dense")
    settings = {"basis": {"num_basis": 4, "num_clusters": 16}, "quant": {"method": "quant", "nbit": 4}}[method]
    config = hf_basis.BasisConfig(**settings)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config)
    reference = hf_basis.convert(dense, **settings)
    assert model.is_quantized and model.hf_basis_config["tied"]
    assert model.config.quantization_config.layers == reference.config.quantization_config.layers
    assert torch.equal(logits(model, inputs()), logits(reference, inputs()))
    model.save_pretrained(tmp_path / "compressed")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")
    assert torch.equal(logits(again, inputs()), logits(reference, inputs()))


def test_folder_shrinks_by_what_report_says(tmp_path):
    """GPT-2's vocabulary (50257 words), tiny hidden size: the saved folder loses the bytes report() predicts."""
    vocab = 50257
    dense = dense_model("gpt2", tie=True, vocab_size=vocab, hidden=32)
    dense.save_pretrained(tmp_path / "dense")
    model = hf_basis.convert(dense, num_basis=4, num_clusters=32)
    model.save_pretrained(tmp_path / "compressed")

    def size(d):
        return sum(f.stat().st_size for f in d.iterdir() if f.name != "README.md")

    rep = hf_basis.report(model)
    saved = size(tmp_path / "dense") - size(tmp_path / "compressed")
    assert rep.bytes_before == vocab * 32 * 4
    # Only the safetensors header and config.json differ beyond the tensors themselves.
    assert saved == pytest.approx(rep.bytes_before - rep.bytes_after, abs=4096)
    assert size(tmp_path / "compressed") < size(tmp_path / "dense") / 4


def test_model_card_states_method_settings_ratio_and_loading(tmp_path):
    model = compressed_model("llama", "basis", tie=False)
    (tmp_path / "README.md").write_text("# My model\n\nNotes the user wrote.\n")
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    ratio = hf_basis.report(model).compression_ratio
    for text in ("Notes the user wrote.", "hf_basis", "num_basis | `4`", "num_clusters | `16`", f"{ratio:.1f}x",
                 "python -m build", "import hf_basis", "AutoModelForCausalLM.from_pretrained"):  # fmt: skip
        assert text in card, text
    model.save_pretrained(tmp_path)  # the section is replaced, not appended twice
    assert (tmp_path / "README.md").read_text().count("## Compressed with hf_basis") == 1


@pytest.mark.parametrize("method", ["basis", "quant"])
def test_dequantize_gives_dense_layers(tmp_path, method):
    compressed_model("gpt2", method, tie=True).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    expected = logits(model, inputs())
    model.dequantize()
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not getattr(model, "is_quantized", False)
    torch.testing.assert_close(logits(model, inputs()), expected)
    model.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


@pytest.mark.parametrize("method", ["basis", "quant"])
def test_t5_shared_embedding_and_its_aliases(tmp_path, method):
    """T5's `shared` is also `encoder.embed_tokens` and `decoder.embed_tokens` (and tied to lm_head): stored once."""
    from transformers import AutoModelForSeq2SeqLM

    from tiny_models import model_inputs

    model = dense_model("t5", tie=None)
    hf_basis.convert(model, **({"method": "quant", "nbit": 4} if method == "quant" else BASIS))
    model.save_pretrained(tmp_path)
    assert sum(k.endswith((".codes", ".packed")) for k in header(tmp_path)) == 1
    loaded, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.shared is loaded.encoder.embed_tokens is loaded.decoder.embed_tokens
    assert storage(loaded.lm_head) is storage(loaded.shared)
    batch = model_inputs("t5", V)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_loaded_model_trains_like_a_converted_one(tmp_path):
    """A model from from_pretrained gets the same fused training loss as one fresh from convert()."""
    from hf_basis.integrations.fused_loss import fused_loss_installed

    model = compressed_model("llama", "basis", tie=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert fused_loss_installed(model) and fused_loss_installed(loaded)
    ids = inputs()
    model.train(), loaded.train()
    loss, loaded_loss = model(ids, labels=ids).loss, loaded(ids, labels=ids).loss
    assert torch.equal(loss, loaded_loss)
    loaded_loss.backward()
    assert loaded.lm_head.codebook.centroids.grad is not None
