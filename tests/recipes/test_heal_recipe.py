"""recipes/heal.py and `hf-basis heal` end to end on a tiny model: convert, heal, save, card, results.json."""

import json
import os
import sys

import pytest
import transformers

import hf_basis
from hf_basis_cli import main as cli_main

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "recipes"))

import heal as heal_recipe  # noqa: E402
from lm_data import build_tokenizer  # noqa: E402

WORDS = "the company said its profit rose in third quarter bank expects market to next year shares fell".split()


def _setup(tmp_path, arch):
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 5)) for i in range(80)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("\n".join(lines[:64]) + "\n")
    (data / "test.txt").write_text("\n".join(lines[64:]) + "\n")
    tokenizer = build_tokenizer(lines)
    tokenizer.pad_token = tokenizer.eos_token
    transformers.set_seed(0)
    if arch == "bert":
        cfg = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    return data


def test_heal_recipe_on_an_encoder_writes_checkpoint_card_and_results(tmp_path):
    data = _setup(tmp_path, "bert")
    out = tmp_path / "out"
    results = heal_recipe.main(["--teacher", str(tmp_path / "teacher"), "--num_basis", "4", "--num_clusters", "8",
                                "--modules", "input", "--data_dir", str(data), "--output_dir", str(out),
                                "--max_steps", "6", "--per_device_train_batch_size", "8", "--use_cpu", "true",
                                "--disable_tqdm", "true"])  # fmt: skip
    saved = json.loads((out / "results.json").read_text())
    assert saved["after_healing"] == results["after_healing"]
    assert saved["command"].startswith("python recipes/heal.py --teacher")
    after = saved["after_healing"]["sentence_cosine"]  # that healing improves it: tests/integrations/test_distillation
    assert 0 < saved["before_healing"]["sentence_cosine"] <= 1 and 0 < after <= 1
    assert saved["teacher_metric"] == {"sentence_cosine": 1.0} and saved["train_sentences"] == 64
    # 6 steps of 8 of the 64 one-token-a-word training lines: 3/4 of an epoch of their words
    words = sum(len(line.split()) for line in (data / "train.txt").read_text().splitlines())
    assert saved["train_tokens"] == round(words * 6 * 8 / 64)
    card = (out / "README.md").read_text()
    assert "## Healing" in card and f"{after:.4f}" in card
    healed = transformers.BertModel.from_pretrained(out)
    assert isinstance(healed.get_input_embeddings(), hf_basis.BasisEmbedding)


def test_cli_heal_on_a_causal_lm(tmp_path, capsys):
    data = _setup(tmp_path, "gpt2")
    out = tmp_path / "out"
    code = cli_main(["heal", "--teacher", str(tmp_path / "teacher"), "--num_basis", "4", "--num_clusters", "8",
                     "--data_dir", str(data), "--output_dir", str(out), "--max_steps", "4",
                     "--per_device_train_batch_size", "8", "--use_cpu", "true", "--disable_tqdm", "true"])
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["heal_args"]["distill_on"] == "logits"
    assert saved["after_healing"]["perplexity"] > 1
    assert saved["command"].startswith("hf-basis heal --teacher")
    assert isinstance(transformers.GPT2LMHeadModel.from_pretrained(out).get_output_embeddings(), hf_basis.BasisLinear)


def test_heal_refuses_two_data_sources_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit):
        heal_recipe.main(["--teacher", str(tmp_path / "nothing"), "--data_dir", "a", "--dataset", "b"])
    assert "exactly one of data_dir or dataset" in capsys.readouterr().err
