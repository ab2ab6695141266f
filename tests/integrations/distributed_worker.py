"""One rank of the 2-process CPU (gloo) checks of tests/integrations/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/integrations/distributed_worker.py OUT_DIR

Each rank writes OUT_DIR/rank{r}.json with what it saw; rank 0 also saves a Trainer run's final model. The one-process
references are computed by the test itself with the same functions (`train_losses`, `trainer_run`), so both sides
run the same code on the same global batches.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: tiny_models, compressed_models
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository: hf_basis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

import hf_basis  # noqa: E402
from hf_basis.integrations import distributed as hd  # noqa: E402
from hf_basis.modules.lazy_logits import LazyLogits  # noqa: E402

V, H, STEPS, GLOBAL_BATCH, SEQ = 64, 16, 3, 4, 8
CASES = {  # name: (architecture, method, tied)
    "basis_tied_gpt2": ("gpt2", "basis", True),
    "basis_llama": ("llama", "basis", False),
    "quant_llama": ("llama", "quant", False),
}
SETTINGS = {"basis": {"num_basis": 4, "num_clusters": 8}, "quant": {"method": "quant", "nbit": 4}}

MATERIALIZED = [0]
_materialize = LazyLogits.materialize


def _counting_materialize(self):
    if self._value is None:
        MATERIALIZED[0] += 1
    return _materialize(self)




def converted(case: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of `case`, converted with `seed` (the dense weights are the same on every rank)."""
    arch, method, tied = CASES[case]
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=H, n_layer=1, n_head=2, n_positions=SEQ,
                                      tie_word_embeddings=tied, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
                                       tie_word_embeddings=tied)
        model = transformers.LlamaForCausalLM(cfg)
    hf_basis.convert(model, seed=seed, **SETTINGS[method])
    return model.train()


def global_batches() -> torch.Tensor:
    """(STEPS, GLOBAL_BATCH, SEQ) token ids, the same on every rank."""
    return torch.randint(0, V, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def train_losses(model: torch.nn.Module, rank: int, world: int, wrapped: torch.nn.Module | None = None) -> list[float]:
    """SGD steps on this rank's share of each global batch; the losses are the global batch's (averaged over ranks:
    every rank has as many tokens)."""
    wrapped = model if wrapped is None else wrapped
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    share = GLOBAL_BATCH // world
    losses = []
    for batch in global_batches():
        ids = batch[rank * share:(rank + 1) * share]
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    return losses


def trainer_args(out_dir: str) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=out_dir, max_steps=4, save_steps=2, save_strategy="steps", logging_steps=1,
        per_device_train_batch_size=GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", "1")), learning_rate=5e-2,
        seed=0, use_cpu=True, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # (True, the default, builds the logits: see the DDP test)
    )  # fmt: skip


def trainer_dataset():
    ids = torch.randint(0, V, (16, SEQ), generator=torch.Generator().manual_seed(2))
    return [{"input_ids": x, "labels": x} for x in ids]


def trainer_run(model_dir: str, out_dir: str, resume: str | None = None):
    """Train the saved model `model_dir` with the Trainer (4 steps, checkpoint every 2) -> (trainer, losses)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = transformers.Trainer(model=model, args=trainer_args(out_dir), train_dataset=trainer_dataset(),
                                   callbacks=[hd.SameCompressedStateCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [e["loss"] for e in trainer.state.log_history if "loss" in e]


def accelerate_fsdp2(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """accelerate's own FSDP2 grouping (what accelerate_fsdp2.yaml runs on GPUs; its plugin refuses CPUs, so the
    function is called here with the few accelerator fields it reads)."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, cpu_ram_efficient_loading=False)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  mixed_precision="no", is_main_process=rank == 0, device=torch.device("cpu"),
                                  parallelism_config=None)  # fmt: skip
    return fsdp2_prepare_model(accelerator, model)


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return None


def _losses(run) -> dict:
    """{"losses", "materialized": how many times the T x V logits were built} or {"error"}."""
    MATERIALIZED[0] = 0
    try:
        return {"losses": run(), "materialized": MATERIALIZED[0]}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}


def main(out: str) -> None:
    LazyLogits.materialize = _counting_materialize  # counts how often the T x V logits get built
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict = {"world": world}

    # Requirement 4: a rank converted with another seed is caught; a broadcast from rank 0 repairs it.
    model = converted("basis_llama", seed=rank)
    result["mismatch_error"] = _error(lambda: hd.check_same_compressed_state(model))
    result["broadcast"] = hd.broadcast_compressed_state(model)
    result["after_broadcast_error"] = _error(lambda: hd.check_same_compressed_state(model))
    result["codes_after_broadcast"] = model.lm_head.codebook.codes.flatten().tolist()
    quant = converted("quant_llama")
    if rank == 1:
        with torch.no_grad():
            quant.lm_head.table.packed[3, 0] ^= 1  # one bit of one word
    result["quant_mismatch_error"] = _error(lambda: hd.check_same_compressed_state(quant))
    # DDP broadcasts rank 0's parameters and buffers when it wraps the model: the differing codes are replaced
    differing = converted("basis_llama", seed=rank)
    torch.nn.parallel.DistributedDataParallel(differing)
    result["after_ddp_wrap_error"] = _error(lambda: hd.check_same_compressed_state(differing))

    # Requirement 2 (and 1): DDP and FSDP2 losses, and how often the T x V logits were built.
    for case in CASES:
        for find_unused in (False, True):
            model = converted(case)
            MATERIALIZED[0] = 0
            ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
            key = f"ddp_{case}" + ("_find_unused" if find_unused else "")
            result[key] = _losses(lambda: train_losses(model, rank, world, ddp))
        model = converted(case)
        hd.fully_shard_compressed(model)
        result[f"fsdp2_{case}"] = _losses(lambda: train_losses(model, rank, world))
        if case == "basis_tied_gpt2":  # FSDP2 full state dict -> save_pretrained on rank 0 -> loads on one process
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                model.save_pretrained(os.path.join(out, "fsdp2_final"), state_dict=state)
        model = converted(case)
        result[f"accelerate_fsdp2_{case}"] = _losses(lambda: train_losses(accelerate_fsdp2(model, rank), rank, world))

    # The rule fully_shard_compressed follows: a tied codebook in two groups is refused by torch.
    from torch.distributed.fsdp import fully_shard

    tied = converted("basis_tied_gpt2")

    def two_groups():
        fully_shard(tied.get_input_embeddings())
        fully_shard(tied.get_output_embeddings())
        fully_shard(tied)
        train_losses(tied, rank, world)

    result["tied_in_two_groups_error"] = _error(two_groups)

    # Requirement 3: Trainer under DDP, checkpoint and exact resume; the final model is saved for one process to load.
    model_dir = os.path.join(out, "model")
    if rank == 0:
        converted("basis_tied_gpt2").save_pretrained(model_dir)
    dist.barrier()
    MATERIALIZED[0] = 0
    trainer, result["trainer_losses"] = trainer_run(model_dir, os.path.join(out, "full"))
    result["trainer_materialized"] = MATERIALIZED[0]
    result["trainer_state"] = {k: v.tolist() for k, v in trainer.model.state_dict().items()}
    resumed, result["resumed_losses"] = trainer_run(model_dir, os.path.join(out, "resumed"),
                                              resume=os.path.join(out, "full", "checkpoint-2"))
    result["resumed_state_equal"] = all(
        torch.equal(v, resumed.model.state_dict()[k]) for k, v in trainer.model.state_dict().items())
    trainer.save_model(os.path.join(out, "final"))
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
