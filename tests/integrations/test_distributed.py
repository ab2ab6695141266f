"""Two CPU processes (gloo) against one (issue 19): codes checked identical across ranks, DDP and FSDP2 losses equal
to one process with the same global batch, Trainer checkpoint + exact resume under DDP, the saved folder loading on
one process. One `torchrun --nproc_per_node 2` launch (tests/integrations/distributed_worker.py) runs every
two-process scenario; the one-process references run here, with the same functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import hf_basis
from hf_basis.integrations import distributed as hd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distributed_worker as worker  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The worker's results of rank 0 and rank 1, and its output folder."""
    out = tmp_path_factory.mktemp("two_ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(REPO, "tests", "integrations", "distributed_worker.py"), str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, out


def test_without_torch_distributed_the_check_and_broadcast_do_nothing():
    model = worker.converted("basis_llama")
    before = model.lm_head.codebook.codes.clone()
    hd.check_same_compressed_state(model)
    assert hd.broadcast_compressed_state(model) == 0
    assert torch.equal(model.lm_head.codebook.codes, before)
    names = [name for name, _ in hd.compressed_tensors(model)]
    assert names == ["model.embed_tokens.codebook.codes", "model.embed_tokens.codebook.centroids",
                     "lm_head.codebook.codes", "lm_head.codebook.centroids"]
    tied = worker.converted("basis_tied_gpt2")  # one codebook shared by embedding and head: listed once
    assert [name for name, _ in hd.compressed_tensors(tied)] == [
        "transformer.wte.codebook.codes", "transformer.wte.codebook.centroids"]


def test_a_rank_converted_with_another_seed_fails_clearly_and_a_broadcast_repairs_it(two_ranks):
    ranks, _ = two_ranks
    for r in ranks:
        assert r["world"] == 2
        # Rank r converted with seed=r: both ranks stop with one line naming the first differing tensor.
        assert r["mismatch_error"].startswith("CompressedStateMismatchError: hf_basis: the compressed layers differ")
        assert "'model.embed_tokens.codebook.codes'" in r["mismatch_error"] and "\n" not in r["mismatch_error"]
        assert "'lm_head.table.packed'" in r["quant_mismatch_error"]  # one flipped bit of a quant head on rank 1
        assert r["broadcast"] == 4 and r["after_broadcast_error"] is None
        assert r["after_ddp_wrap_error"] is None  # DDP's own broadcast of buffers at wrap time
    # Both ranks hold rank 0's codes, i.e. those of a conversion with seed 0 (the reference, converted here).
    reference = worker.converted("basis_llama", seed=0).lm_head.codebook.codes.flatten().tolist()
    assert ranks[0]["codes_after_broadcast"] == ranks[1]["codes_after_broadcast"] == reference
    assert worker.converted("basis_llama", seed=1).lm_head.codebook.codes.flatten().tolist() != reference


@pytest.mark.parametrize("case", list(worker.CASES))
def test_two_processes_match_one_with_the_same_global_batch(two_ranks, case):
    ranks, _ = two_ranks
    one = worker.train_losses(worker.converted(case), rank=0, world=1)  # batch 4 in one process
    wrappers = ["ddp", "ddp_find_unused", "fsdp2"] + (["accelerate_fsdp2"] if case != "basis_tied_gpt2" else [])
    for wrapper in wrappers:
        key = f"ddp_{case}_find_unused" if wrapper == "ddp_find_unused" else f"{wrapper}_{case}"
        for r in ranks:
            assert "error" not in r[key], (key, r[key])
            torch.testing.assert_close(torch.tensor(r[key]["losses"]), torch.tensor(one), rtol=1e-5, atol=1e-6,
                                       msg=key)
    assert one[0] != one[-1]  # the steps trained something


@pytest.mark.parametrize("case", ["basis_tied_gpt2", "basis_llama"])
def test_the_fused_loss_stays_fused_under_ddp(two_ranks, case):
    """No T x V logits under DDP, with the Trainer's default find_unused_parameters=True too (issue 15 item 2)."""
    ranks, _ = two_ranks
    for r in ranks:
        assert r[f"ddp_{case}"]["materialized"] == 0
        assert r[f"ddp_{case}_find_unused"]["materialized"] == 0, "DDP(find_unused_parameters=True) built the logits"


@pytest.mark.parametrize("case", ["basis_tied_gpt2", "basis_llama"])
def test_the_fused_loss_stays_fused_under_fsdp2(two_ranks, case):
    ranks, _ = two_ranks
    for r in ranks:
        assert r[f"fsdp2_{case}"]["materialized"] == 0


def test_a_tied_codebook_in_two_fully_shard_groups_is_refused(two_ranks):
    """The rule `fully_shard_compressed` follows (embedding and head in one group) is torch's, checked here. accelerate's
    FSDP2 grouping detects a tie by `input_embed.weight is output_embed.weight`, which a basis layer's decoded
    `.weight` never is: it splits a tied codebook too (README: apply fully_shard_compressed first)."""
    ranks, _ = two_ranks
    for r in ranks:
        assert r["tied_in_two_groups_error"] is not None
        assert "error" in r["accelerate_fsdp2_basis_tied_gpt2"]


def test_an_fsdp2_full_state_dict_saves_and_loads_on_one_process(two_ranks):
    ranks, out = two_ranks
    reference = worker.converted("basis_tied_gpt2")
    worker.train_losses(reference, rank=0, world=1)  # the same steps in one process
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "fsdp2_final")
    assert loaded.config.quantization_config.to_dict()["quant_method"] == "hf_basis"
    assert loaded.get_input_embeddings().codebook is loaded.get_output_embeddings().codebook
    expected = reference.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_under_ddp_matches_one_process_resumes_exactly_and_loads_on_one_process(two_ranks, tmp_path):
    ranks, out = two_ranks
    model_dir = str(out / "model")
    _, one = worker.trainer_run(model_dir, str(tmp_path / "one"))  # one process, batch 4
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["trainer_losses"]), torch.tensor(one), rtol=1e-5, atol=1e-6)
        # resumed from the step-2 checkpoint: the same last two losses and the same final weights, bit for bit
        assert r["resumed_losses"][2:] == r["trainer_losses"][2:]
        assert r["resumed_state_equal"]
        assert r["trainer_materialized"] == 0  # ddp_find_unused_parameters=False: the loss stayed fused
    assert ranks[0]["trainer_state"] == ranks[1]["trainer_state"]

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    config = loaded.config.quantization_config
    config = config if isinstance(config, dict) else config.to_dict()
    assert config["quant_method"] == "hf_basis" and config["method"] == "basis" and config["tied"]
    assert loaded.get_input_embeddings().codebook is loaded.get_output_embeddings().codebook
    assert isinstance(loaded.get_output_embeddings(), hf_basis.BasisLinear)
    state = loaded.state_dict()
    for name, values in ranks[0]["trainer_state"].items():
        assert torch.equal(state[name], torch.tensor(values, dtype=state[name].dtype)), name
