"""The PTB recipe under `accelerate launch` with the shipped DDP config: 2 CPU processes (gloo), dense -> basis switch
(every rank converts, rank 0's codebook is broadcast, the Trainer checks it identical), saved model loads on one."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_basis
from test_train_recipes import REPO, TINY, tiny_corpus  # noqa: F401  (tiny_corpus is a fixture)


def test_the_accelerate_configs_load_as_ddp_and_fsdp2():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(os.path.join(REPO, "recipes", "configs", "accelerate_ddp.yaml"))
    fsdp = load_config_from_file(os.path.join(REPO, "recipes", "configs", "accelerate_fsdp2.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.num_processes == 2
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2


@pytest.mark.slow
def test_ptb_recipe_trains_with_two_processes_through_the_accelerate_ddp_config(tiny_corpus, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(REPO, "recipes", "configs", "accelerate_ddp.yaml"), "--num_processes", "2",
        os.path.join(REPO, "recipes", "train_ptb.py"), "--use_cpu", "true",  # CPU: gloo instead of NCCL
        "--data_dir", tiny_corpus, "--cache_dir", str(tmp_path / "cache"), *TINY, "--output_dir", str(out),
        "--max_steps", "6", "--num_train_epochs", "2", "--dense_warmup_epochs", "1", "--compression", "basis",
        "--basis_modules", "output", "--num_basis", "4", "--num_clusters", "8", "--per_device_train_batch_size", "4",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert run.stderr.count("[hf_basis] basis: training started (3 steps)") == 2  # both processes trained
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["compression"] == "basis"
    assert results["switch"]["eval_perplexity_after"] > 0 and results["test_perplexity"] < results["switch"][
        "eval_perplexity_before"]  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.get_output_embeddings(), hf_basis.BasisLinear)
    assert model.config.quantization_config.to_dict()["quant_method"] == "hf_basis"
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()
