"""The conversion record has one owner: whatever convert / quantize_embed did saves and loads back (issue 15, items
6, 7, 9, 10, 13, 16, 20; issue 16, item 7)."""

import json
import os
import warnings

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, Trainer, TrainingArguments

import hf_basis
from compressed_models import BASIS, V, compressed_model, dense_model, inputs, logits
from hf_basis import BasisEmbedding, BasisLinear, QuantEmbedding, QuantLinear
from hf_basis.integrations import CheckpointMismatchError
from tiny_models import model_inputs


@torch.no_grad()
def outputs(model, arch):
    """The first output tensor (logits) of the model on fixed inputs of its architecture."""
    return model(**model_inputs(arch, V)).logits


def edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------------ item 6
def test_input_then_output_conversion_saves_and_loads_both(tmp_path):
    model = dense_model("llama", tie=False)
    hf_basis.convert(model, **BASIS, modules="input")
    hf_basis.convert(model, **BASIS, modules="output")
    assert model.hf_basis_config["modules"] == "both" and len(model.hf_basis_config["layers"]) == 2
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.get_input_embeddings(), BasisEmbedding)
    assert isinstance(loaded.get_output_embeddings(), BasisLinear)
    # The embedding comes back as saved, not randomly initialised.
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(logits(loaded, inputs()), logits(model, inputs()))


def test_second_conversion_with_other_settings_is_refused_before_touching(tmp_path):
    model = dense_model("llama", tie=False)
    hf_basis.convert(model, **BASIS, modules="input")
    head = model.get_output_embeddings()
    with pytest.raises(ValueError, match="already holds layers compressed by hf_basis.*same settings"):
        hf_basis.convert(model, method="quant", nbit=4, modules="output")
    with pytest.raises(ValueError, match="already holds layers compressed"):
        hf_basis.convert(model, num_basis=8, num_clusters=16, modules="output")
    assert model.get_output_embeddings() is head and type(head) is nn.Linear
    assert model.hf_basis_config["modules"] == "input"
    gpt2 = dense_model("gpt2", tie=False)
    hf_basis.convert(gpt2, method="quant", nbit=4, modules="output")
    with pytest.raises(ValueError, match="already holds layers compressed"):
        hf_basis.quantize_embed(gpt2, nbit=4)  # would compress wte and wpe under another record
    assert type(gpt2.transformer.wte) is nn.Embedding and type(gpt2.transformer.wpe) is nn.Embedding


# ------------------------------------------------------------------------------------------------ item 7
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_quantize_embed_saves_and_loads_like_convert(tmp_path, arch):
    model = dense_model(arch, tie=True)
    dense_weight = model.get_input_embeddings().weight.detach().clone()
    with pytest.warns(UserWarning, match="untied"):  # the tied lm_head stays dense
        hf_basis.quantize_embed(model, nbit=4)
    expected = outputs(model, arch)
    model.save_pretrained(tmp_path)
    cls = transformers.T5ForConditionalGeneration if arch == "t5" else AutoModelForCausalLM
    loaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    quantized = {n for n, m in loaded.named_modules() if isinstance(m, QuantEmbedding)}
    assert quantized == {n for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    assert not any(type(m) is nn.Embedding for m in loaded.modules())
    assert torch.equal(outputs(loaded, arch), expected)
    # The tables are the ones quantized from the dense weights, not new random ones.
    reference = QuantEmbedding(V, 32, _weight=dense_weight, nbit=4)
    assert torch.equal(loaded.get_input_embeddings().weight, reference.weight)
    if arch == "t5":
        assert loaded.shared is loaded.encoder.embed_tokens is loaded.decoder.embed_tokens


def test_quantize_embed_while_loading(tmp_path):
    dense = dense_model("gpt2", tie=False)
    dense.save_pretrained(tmp_path)
    config = hf_basis.BasisConfig(method="quant", nbit=2, modules="embeddings")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    assert isinstance(model.transformer.wte, QuantEmbedding) and isinstance(model.transformer.wpe, QuantEmbedding)
    hf_basis.quantize_embed(dense, nbit=2)
    assert torch.equal(logits(model, inputs()), logits(dense, inputs()))


# ------------------------------------------------------------------------------------------------ item 9
@pytest.mark.parametrize("arch, tie, modules", [("t5", True, "output"), ("t5", False, "output"),
                                                ("bert-mlm", None, "input")])
def test_partial_conversion_of_shared_tensors_saves_and_loads(tmp_path, arch, tie, modules):
    model = dense_model(arch, tie=tie)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tie warning is tested below
        hf_basis.convert(model, **BASIS, modules=modules)
    expected = outputs(model, arch)
    model.save_pretrained(tmp_path)
    cls = transformers.T5ForConditionalGeneration if arch == "t5" else AutoModelForMaskedLM
    loaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(outputs(loaded, arch), expected)
    if arch == "t5":
        assert loaded.shared.weight is loaded.encoder.embed_tokens.weight is loaded.decoder.embed_tokens.weight


def test_trainer_checkpoint_of_a_partial_conversion(tmp_path):
    model = dense_model("bert-mlm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_basis.convert(model, **BASIS, modules="input")
    ids = torch.randint(0, V, (8, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, save_steps=1, save_strategy="steps",
                             per_device_train_batch_size=4, use_cpu=True, report_to=[], disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids]).train()
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "checkpoint-1")
    assert torch.equal(outputs(loaded.eval(), "bert-mlm"), outputs(model.eval(), "bert-mlm"))


# --------------------------------------------------------------------------------------- issue 16, item 7
@pytest.mark.parametrize("modules", ["input", "output"])
def test_one_side_of_a_tied_pair_unties_with_a_warning(tmp_path, modules):
    model = dense_model("gpt2", tie=True)
    dense_emb = model.get_input_embeddings().weight.detach().clone()
    with pytest.warns(UserWarning, match=f"modules='{modules}' compressed the .* only.*untied"):
        hf_basis.convert(model, **BASIS, modules=modules)
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.tie_word_embeddings is False
    if modules == "output":
        assert type(loaded.get_input_embeddings()) is nn.Embedding
        assert torch.equal(loaded.get_input_embeddings().weight, dense_emb)
    assert torch.equal(logits(loaded, inputs()), logits(model, inputs()))


def test_both_sides_of_a_tied_pair_stay_tied_without_a_warning():
    model = dense_model("gpt2", tie=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_basis.convert(model, **BASIS)
    assert model.config.tie_word_embeddings is True


# ------------------------------------------------------------------------------------------------ item 10
def test_config_edited_to_tied_is_refused(tmp_path):
    compressed_model("llama", "basis", tie=False).save_pretrained(tmp_path)

    def make_tied(config):
        qc = config["quantization_config"]
        qc["tied"] = True
        qc["layers"]["lm_head"]["tied_to"] = "model.embed_tokens"
        config["tie_word_embeddings"] = True

    edit_config(tmp_path, make_tied)
    with pytest.raises(CheckpointMismatchError, match="declared tied .* holds its own table"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("method, key", [("basis", "transformer.wte.codebook.centroids"),
                                         ("quant", "transformer.wte.table.levels")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tables_are_refused(tmp_path, method, key, bad):
    import safetensors.torch

    compressed_model("gpt2", method, tie=True).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = bad
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="NaN or infinite"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ item 13
@pytest.mark.parametrize("method", ["basis", "quant"])
def test_dequantize_a_model_converted_in_memory(tmp_path, method):
    model = compressed_model("gpt2", method, tie=True)
    decoded = model.get_input_embeddings().weight.detach().clone()  # the compressed (tied) matrix, decoded
    expected = logits(model, inputs())
    model.dequantize()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(emb) is nn.Embedding and type(head) is nn.Linear and head.weight is emb.weight
    assert torch.equal(head.weight, decoded)
    assert getattr(model.config, "quantization_config", None) is None and not hasattr(model, "hf_basis_config")
    torch.testing.assert_close(logits(model, inputs()), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)  # a plain transformers checkpoint again
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert getattr(AutoModelForCausalLM.from_pretrained(tmp_path), "hf_quantizer", None) is None


# ------------------------------------------------------------------------------------------------ item 16
@pytest.mark.parametrize("kwargs, message", [
    ({"method": "quant", "nbit": True}, "nbit must be one of"),
    ({"method": "quant", "nbit": 4.0}, "nbit must be one of"),
    ({"num_basis": True}, "num_basis must be a positive integer"),
    ({"num_basis": 4.0}, "num_basis must be a positive integer"),
    ({"num_clusters": True}, "num_clusters must be an integer"),
    ({"seed": "0"}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"method": "quant", "stochastic_round": 1}, "stochastic_round must be True or False"),
    ({"modules": ["input"]}, "modules must be one of"),
    ({"method": None}, "method must be one of"),
])  # fmt: skip
def test_every_convert_argument_is_checked_before_the_model_is_touched(kwargs, message):
    model = dense_model("gpt2", tie=True)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    with pytest.raises(ValueError, match=message):
        hf_basis.convert(model, **{**BASIS, **kwargs})
    assert model.get_input_embeddings() is emb and model.get_output_embeddings() is head
    assert not hasattr(model, "hf_basis_config") and getattr(model.config, "quantization_config", None) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"nbit": True}, "nbit must be one of"),
    ({"nbit": 2.0}, "nbit must be one of"),
    ({"nbit": 4, "seed": 1.5}, "seed must be an integer or None"),
    ({"nbit": 4, "stochastic_round": "yes"}, "stochastic_round must be True or False"),
])  # fmt: skip
def test_every_quantize_embed_argument_is_checked_before_the_model_is_touched(kwargs, message):
    model = dense_model("gpt2", tie=False)
    with pytest.raises(ValueError, match=message):
        hf_basis.quantize_embed(model, **kwargs)
    assert not any(isinstance(m, (QuantEmbedding, QuantLinear)) for m in model.modules())


def test_quantize_embed_refusing_one_embedding_replaces_none():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Embedding(5, 3, dtype=torch.float64))  # quant refuses float64
    with pytest.raises(ValueError, match="float64"):
        hf_basis.quantize_embed(model, nbit=4)
    assert type(model[0]) is nn.Embedding


# ------------------------------------------------------------------------------------------------ item 20
@pytest.mark.parametrize("existing", [False, True])
def test_save_does_not_depend_on_the_working_directory(tmp_path, monkeypatch, existing):
    model = compressed_model("gpt2", "basis", tie=True)
    target = tmp_path / "saved"
    if existing:
        model.save_pretrained(target)
    gone = tmp_path / "launch"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # the job's launch folder was replaced while it trained
    model.save_pretrained(target)
    monkeypatch.chdir(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(target), inputs()), logits(model, inputs()))
    assert os.path.isfile(target / "README.md")
