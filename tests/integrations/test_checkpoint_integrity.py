"""Bad checkpoints fail loudly; saves are atomic (issue 5, point 5; the interrupted push is in test_hub_push.py)."""

import json
import os

import pytest
import safetensors.torch
import torch
import transformers.modeling_utils
from transformers import AutoModelForCausalLM

import hf_basis
from compressed_models import compressed_model, inputs, logits
from hf_basis.integrations import CheckpointMismatchError


def edit_tensors(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = safetensors.torch.load_file(file)
    edit(tensors)
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})


def edit_config(path, edit):
    file = os.path.join(path, "config.json")
    config = json.loads(open(file).read())
    edit(config)
    open(file, "w").write(json.dumps(config))


@pytest.fixture
def saved(tmp_path):
    """An untied compressed Llama (both layers store their own tensors) and a tied compressed GPT-2."""
    compressed_model("llama", "basis", tie=False).save_pretrained(tmp_path / "llama")
    compressed_model("gpt2", "quant", tie=True).save_pretrained(tmp_path / "gpt2")
    return tmp_path


def replace(tensors, key, change):
    tensors[key] = change(tensors[key])


def set_code(tensors):
    tensors["lm_head.codebook.codes"][3, 1] = 200  # num_clusters is 16


BAD_CHECKPOINTS = [
    # (model, how the checkpoint is damaged, words the error must contain)
    ("llama", lambda p: edit_tensors(p, set_code), "num_clusters"),
    ("llama", lambda p: edit_tensors(p, lambda t: t.pop("lm_head.codebook.centroids")), "missing tensor lm_head"),
    ("llama", lambda p: edit_tensors(p, lambda t: t.pop("model.embed_tokens.codebook.codes")), "missing tensor"),
    ("llama", lambda p: edit_tensors(p, lambda t: replace(t, "lm_head.codebook.codes", lambda x: x.float())),
     "expected uint8"),
    ("llama", lambda p: edit_tensors(p, lambda t: replace(t, "lm_head.codebook.codes", lambda x: x[:, :2].clone())),
     "shape"),
    ("llama", lambda p: edit_config(p, lambda c: c["quantization_config"].update(num_basis=8)), "shape"),
    ("llama", lambda p: edit_config(p, lambda c: c["quantization_config"].update(num_clusters=300)), "expected int16"),
    ("llama", lambda p: edit_config(p, lambda c: c.update(vocab_size=301)), "vocab_size"),
    ("llama", lambda p: edit_config(p, lambda c: c["quantization_config"].pop("layers")), "layers"),
    ("gpt2", lambda p: edit_config(p, lambda c: c["quantization_config"].update(nbit=2)), "shape"),
    ("gpt2", lambda p: edit_tensors(p, lambda t: t.pop("transformer.wte.table.packed")), "missing tensor"),
    ("gpt2", lambda p: edit_tensors(p, lambda t: replace(t, "transformer.wte.table.levels", lambda x: x[:4].clone())),
     "shape"),
]  # fmt: skip


@pytest.mark.parametrize("arch, damage, message", BAD_CHECKPOINTS)
def test_checkpoint_disagreeing_with_its_config_fails_clearly(saved, arch, damage, message):
    path = saved / arch
    damage(path)
    with pytest.raises(CheckpointMismatchError, match=message):
        AutoModelForCausalLM.from_pretrained(path)


def test_quantization_config_is_validated():
    with pytest.raises(ValueError, match="num_basis must be a positive integer"):
        hf_basis.BasisConfig(num_basis=0)
    with pytest.raises(ValueError, match="method must be one of"):
        hf_basis.BasisConfig(method="pq")
    with pytest.raises(ValueError, match="nbit applies to method='quant' only"):
        hf_basis.BasisConfig(nbit=4)
    with pytest.raises(ValueError, match="nbit must be one of"):
        hf_basis.BasisConfig(method="quant", nbit=3)
    with pytest.raises(ValueError, match="upgrade hf_basis"):
        hf_basis.BasisConfig(format_version=99)
    layers = {"emb": {"role": "input", "kind": "BasisEmbedding", "shape": [300, 30]}}
    with pytest.raises(ValueError, match="does not divide the hidden size"):
        hf_basis.BasisConfig(num_basis=4, modules="input", layers=layers)
    with pytest.raises(ValueError, match="needs layers with roles"):
        hf_basis.BasisConfig(num_basis=3, layers=layers)


def test_config_json_round_trip_and_registration():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from hf_basis.integrations import HfBasisQuantizer

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hf_basis"] is hf_basis.BasisConfig
    assert AUTO_QUANTIZER_MAPPING["hf_basis"] is HfBasisQuantizer
    model = compressed_model("gpt2", "basis", tie=True)
    cfg = model.config.quantization_config
    again = hf_basis.BasisConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.to_dict() == cfg.to_dict()
    assert again.to_hf_basis_config()["layers"] == model.hf_basis_config["layers"]
    assert hf_basis.BasisConfig.from_dict({**cfg.to_dict(), "some_future_field": 1}).layers == cfg.layers


def failing_save(*args, **kwargs):
    """Writes half a file, then fails like a full disk."""
    with open(args[1], "wb") as f:
        f.write(b"\0" * 100)
    raise OSError(28, "No space left on device")


def test_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    model = compressed_model("gpt2", "basis", tie=True)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == []  # neither the target nor a staging folder


def test_failed_save_keeps_the_previous_copy(tmp_path, monkeypatch):
    old = compressed_model("gpt2", "basis", tie=True)
    old.save_pretrained(tmp_path / "out")
    (tmp_path / "out" / "tokenizer.json").write_text("{}")
    before = {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")}

    new = compressed_model("gpt2", "basis", tie=True)
    with torch.no_grad():
        new.get_input_embeddings().codebook.centroids.add_(1.0)
    with monkeypatch.context() as m:
        m.setattr(transformers.modeling_utils, "safe_save_file", failing_save)
        with pytest.raises(OSError):
            new.save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"]
    assert {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")} == before
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), inputs()), logits(old, inputs()))

    # A save that succeeds replaces the model files and keeps the others (here the tokenizer's).
    new.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), inputs()), logits(new, inputs()))


def test_legacy_bin_checkpoint_is_checked_too(tmp_path):
    """Without safetensors headers to read first, missing tensors are caught after loading."""
    model = compressed_model("gpt2", "basis", tie=True)
    model.save_pretrained(tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), inputs()), logits(model, inputs()))
    tensors.pop("transformer.wte.codebook.centroids")
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match="codebook.centroids is missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_saving_into_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    first, second = compressed_model("gpt2", "basis", tie=True), compressed_model("gpt2", "basis", tie=True)
    first.save_pretrained(".")
    (tmp_path / "out" / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an earlier save")
    second.save_pretrained(".")
    assert os.getcwd() == str(tmp_path / "out") and sorted(os.listdir(tmp_path)) == ["out"]
    assert "model-00001-of-00002.safetensors" not in os.listdir(".")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained("."), inputs()), logits(second, inputs()))
