"""The `hf-basis` command line (issue 5, point 4; issue 16, point 5; issue 15, points 8 and 17); `hf-basis push` to
a working Hub is exercised in test_hub_push.py."""

import importlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_basis
from compressed_models import dense_model, inputs, logits
from hf_basis_cli import EXIT_FAILED, EXIT_INPUT, main

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
    out = capsys.readouterr().out
    assert "usage: hf-basis" in out and "exit codes: 0 success; 1" in out


@pytest.mark.parametrize("arch", ["llama", "lstm"])
def test_convert_then_report(tmp_path, capsys, arch):
    dense = dense_model(arch, tie=False)
    dense.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer_config.json").write_text("{}")

    argv = ["convert", str(tmp_path / "dense"), str(tmp_path / "out"), "--num-basis", "4", "--num-clusters", "16"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "BasisEmbedding" in out and "BasisLinear" in out and "total" in out
    # Progress on stderr: each step, what is compressed (hf_basis' log) and the k-means bars.
    assert "loading" in err and "saving to" in err and "into 4 x 16 basis codes" in err and "hf_basis k-means" in err
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
    assert main(["report", str(tmp_path / "dense")]) == EXIT_INPUT
    assert "not an hf_basis checkpoint" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "dense"), str(tmp_path / "out"), "--num-basis", "5"]) == EXIT_INPUT
    assert "num_basis=5 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_help_and_path_errors_import_neither_torch_nor_transformers(tmp_path):
    """`hf-basis --help` used to import torch and transformers through hf_basis (8-9 s); now neither it, nor a bad
    option, nor a path that cannot work imports them: the answer comes at once."""
    (tmp_path / "d").mkdir()
    code = ("import sys, hf_basis_cli\n"
            "codes = []\n"
            "for argv in (['--help'], ['convert', '--help'], ['convert'], ['convert', './missing', 'o'],\n"
            "             ['convert', 'd', 'd'], ['convert', 'd', 'd/.'], ['report', 'a/b/c'], ['push', 'x', 'u/r']):\n"
            "    try: codes.append(hf_basis_cli.main(argv))\n"
            "    except SystemExit as e: codes.append(e.code)\n"
            "print(codes, sorted(m for m in ('torch', 'transformers', 'hf_basis') if m in sys.modules))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.stdout.strip().splitlines()[-1] == "[0, 0, 2, 2, 2, 2, 2, 2] []", run.stdout + run.stderr


def test_convert_into_its_source_is_refused_before_anything_is_written(tmp_path, capsys):
    """`hf-basis convert D D` overwrote the dense checkpoint, then failed with SameFileError (issue 15, point 8)."""
    dense = tmp_path / "dense"
    dense_model("llama", tie=False).save_pretrained(dense)
    (dense / "tokenizer_config.json").write_text("{}")
    before = _snapshot(dense)
    for out, flags in ((dense, []), (dense, ["--overwrite"]), (tmp_path / "." / "dense" / ".." / "dense", [])):
        assert main(["convert", str(dense), str(out), *flags]) == EXIT_INPUT
        assert "is SRC_DIR" in _error_line(capsys)
        assert _snapshot(dense) == before and sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_convert_refuses_an_existing_output_unless_overwrite(tmp_path, capsys):
    dense = tmp_path / "dense"
    dense_model("llama", tie=False).save_pretrained(dense)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["convert", str(dense), str(out), "--num-basis", "4", "--num-clusters", "16"]
    assert main(argv) == EXIT_INPUT
    assert "exists; pass --overwrite" in _error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main([*argv, "--overwrite"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.hf_basis_config["num_basis"] == 4


@pytest.mark.parametrize("src", ["./no/such/folder", "nowhere/a/b", "no-such-model-here"])
def test_missing_source_is_one_line_exit_2(tmp_path, capsys, src, monkeypatch):
    """A missing folder used to get transformers' "Repo id must be in the form ..." (issue 15, point 17)."""
    monkeypatch.chdir(tmp_path)
    assert main(["convert", src, str(tmp_path / "out")]) == EXIT_INPUT
    line = _error_line(capsys)
    assert line.startswith("hf-basis convert: error:") and src in line and "Repo id must be" not in line
    assert "does not exist" in line or "there is no folder" in line
    assert not (tmp_path / "out").exists()
    assert main(["report", src]) == EXIT_INPUT and src in _error_line(capsys)


def test_unsupported_model_is_one_line_exit_2(tmp_path, capsys):
    """BART's scaled embedding cannot be reproduced: a one-line refusal, not a traceback (issue 15, point 17)."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                     scale_embedding=True)  # fmt: skip
    BartForConditionalGeneration(cfg).save_pretrained(tmp_path / "bart")
    assert main(["convert", str(tmp_path / "bart"), str(tmp_path / "out")]) == EXIT_INPUT
    line = _error_line(capsys)
    assert "own forward" in line and "ScaledWordEmbedding" in line and "modules='output' compresses" in line
    assert not (tmp_path / "out").exists()


def test_push_network_failure_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    """A Hub that cannot be reached used to give a raw httpx traceback."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hf_basis.convert(dense_model("llama", tie=False), num_basis=4, num_clusters=16).save_pretrained(tmp_path / "c")
    assert main(["push", str(tmp_path / "c"), "user/tiny"]) == EXIT_FAILED
    line = _error_line(capsys)
    assert line.startswith("hf-basis push: error: push to user/tiny at http://127.0.0.1:") and "failed" in line


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_folders_have_transformers_permissions(tmp_path, umask):
    """Compressed saves came out 0700 (tempfile.mkdtemp) where transformers' own are 0777 & ~umask (issue 16, 6)."""
    old = os.umask(umask)
    try:
        dense = dense_model("llama", tie=False)
        dense.save_pretrained(tmp_path / "dense")  # plain transformers: the reference
        hf_basis.convert(dense, num_basis=4, num_clusters=16).save_pretrained(tmp_path / "api")
        assert main(["convert", str(tmp_path / "dense"), str(tmp_path / "cli"), "--num-basis", "4"]) == 0
    finally:
        os.umask(old)
    expected = 0o777 & ~umask
    assert (tmp_path / "dense").stat().st_mode & 0o777 == expected
    for name in ("api", "cli"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected
        for f in (tmp_path / name).iterdir():  # files as transformers writes them (its safetensors file is 0600)
            reference = tmp_path / "dense" / (f.name if f.name != "README.md" else "config.json")
            assert f.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777, f.name
