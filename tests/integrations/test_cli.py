"""The `hf-basis` command line (issue 5, point 4); `hf-basis push` is exercised in test_hub_push.py."""

import importlib
import json
import tomllib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_basis
from compressed_models import dense_model, inputs, logits
from hf_basis.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["hf-basis"].partition(":")
    assert getattr(importlib.import_module(module), func) is main


@pytest.mark.parametrize("argv", [[], ["convert"], ["report"], ["push"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hf-basis" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["llama", "lstm"])
def test_convert_then_report(tmp_path, capsys, arch):
    dense = dense_model(arch, tie=False)
    dense.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer_config.json").write_text("{}")

    argv = ["convert", str(tmp_path / "dense"), str(tmp_path / "out"), "--num-basis", "4", "--num-clusters", "16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "BasisEmbedding" in out and "BasisLinear" in out and "total" in out
    assert (tmp_path / "out" / "tokenizer_config.json").exists() and (tmp_path / "out" / "README.md").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(model, inputs()), logits(hf_basis.convert(dense, num_basis=4, num_clusters=16), inputs()))

    assert main(["report", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    ratio = hf_basis.report(model).compression_ratio
    assert "num_basis=4, num_clusters=16" in table and f"{ratio:.1f}x" in table and "folder on disk" in table
    assert main(["report", str(tmp_path / "out"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["compression_ratio"] == pytest.approx(ratio) and data["settings"]["num_basis"] == 4


def test_convert_quant(tmp_path, capsys):
    dense_model("gpt2", tie=True).save_pretrained(tmp_path / "dense")
    assert main(["convert", str(tmp_path / "dense"), str(tmp_path / "out"), "--method", "quant", "--nbit", "2"]) == 0
    assert "QuantEmbedding (tied" not in capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.hf_basis_config["method"] == "quant" and model.hf_basis_config["nbit"] == 2
    assert model.get_input_embeddings().table is model.get_output_embeddings().table


def test_errors_are_reported_not_raised(tmp_path, capsys):
    dense_model("gpt2", tie=True).save_pretrained(tmp_path / "dense")
    assert main(["report", str(tmp_path / "dense")]) == 1
    assert "not an hf_basis checkpoint" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "dense"), str(tmp_path / "out"), "--num-basis", "5"]) == 1
    assert "num_basis=5 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
