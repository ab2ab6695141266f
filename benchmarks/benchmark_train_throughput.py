"""End-to-end training throughput: a 12-layer H=768 Llama-style LM with V=128,256, dense head vs 8 x 384 basis head.

Untied embeddings, AdamW, batch 8 x 2048 random tokens, SDPA attention, in four loops (`--loops`):
  plain         measured_anchors.md's "End to end" setting: bf16 weights, a plain PyTorch loop (forward with labels ->
                loss -> backward -> torch.optim.AdamW step -> zero_grad)
  compiled      the same loop with its forward compiled: torch.compile (inductor, default mode) of the model's call
                returning the loss alone (the optimizer step stays eager). Returning only the loss is what lets the
                compiler drop the basis head's logits: a compiled graph must compute every output it returns, and
                `model(...)` returns the logits too (eager, the fused loss never builds them; compiled, they would be
                decoded every step, 4 GiB at the default sizes). The warm-up steps include the compilation (>= 2 are
                kept: forward and backward graphs compile on the first step); the row also reports dynamo's graph
                breaks, recompiles and graphs for the run
  trainer       the same bf16 model trained by transformers.Trainer with `bf16=True` and its defaults (fused AdamW,
                gradient clipping at 1.0, linear schedule): what `recipes/` users run on a bf16 checkpoint
  trainer_fp32  Trainer `bf16=True` on fp32 weights: autocast mixed precision with fp32 master weights
  dense        nn.Linear head, transformers' default loss (F.cross_entropy on fp32-upcast logits)
  dense_liger  same, Liger's fused linear CE patched in (if liger-kernel imports)
  basis        the head replaced by a BasisLinear (8 x 384, random codes) with hf_basis' fused loss installed,
               as hf_basis.convert does: training calls never build the logits (the issue's comparison: head only)
  basis_in_out the same, and the input embedding a BasisEmbedding (8 x 384) too: what hf_basis.convert does by
               default (an extra row; not the head-only comparison)
  no_head      the decoder alone, no output layer (loss: mean square of the last hidden state; plain and compiled
               loops, one process): the step time any head adds its cost to, so dense / no_head bounds the speed-up
               a cheaper head can give
Reports tokens/s over the timed steps (plain / compiled: CUDA events; Trainer: wall time between synchronised
callbacks, so its host-side work counts), ms per step and the peak allocated memory (GiB) over the timed steps.

    PYTHONPATH=. python benchmarks/benchmark_train_throughput.py     # -> benchmarks/results/train_throughput_<gpu>.json
    PYTHONPATH=. python benchmarks/benchmark_train_throughput.py --tiny --device cpu --loops plain,compiled \
        --heads dense,basis --out /tmp/tp.json                       # smoke test: a 2-layer H=64 model, seconds on CPU

On CPU (`--device cpu`) steps are timed by wall clock and no peak memory is reported.

Several GPUs (`--num-processes N`, plain loop only): the script relaunches itself with `torchrun --standalone
--nproc_per_node N`; each process trains batch `--batch` on its GPU, the model wrapped by `--parallel ddp`
(DistributedDataParallel) or `fsdp2` (`hf_basis.integrations.distributed.fully_shard_compressed`: one FSDP2 group per
decoder block, embedding + head in one). tokens/s counts all processes; peak GiB is the largest of any GPU.

    PYTHONPATH=. python benchmarks/benchmark_train_throughput.py --loops plain --heads dense,basis \
        --num-processes 2 --parallel ddp
    # -> benchmarks/results/train_throughput_2x-ddp_<gpu>.json; compare tokens/s with the --num-processes 1 run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_utils import device_name, result_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_basis.integrations.distributed import fully_shard_compressed  # noqa: E402
from hf_basis.integrations.fused_loss import install_fused_loss  # noqa: E402
from hf_basis.modules.basis_embedding import BasisEmbedding  # noqa: E402
from hf_basis.modules.basis_linear import BasisLinear  # noqa: E402

GiB = 2**30


TINY = {"vocab": 512, "batch": 2, "seq": 32, "hidden": 64, "layers": 2, "num_basis": 4, "clusters": 16, "warmup": 2,
        "steps": 2}  # --tiny: a smoke test of every loop, seconds on a CPU


def with_random_codes(module: torch.nn.Module, clusters: int) -> torch.nn.Module:
    codes = module.codebook.codes
    with torch.no_grad():
        codes.copy_(torch.randint(0, clusters, codes.shape, device=codes.device))
    return module


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(head: str, args, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    heads = max(1, args.hidden // 64)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=args.seq, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(cfg)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    model.to(dtype)
    if head in ("basis", "basis_in_out"):
        new = BasisLinear(args.hidden, args.vocab, args.num_basis, args.clusters, bias=False, device=args.device,
                          dtype=dtype)
        model.set_output_embeddings(with_random_codes(new, args.clusters))
        assert install_fused_loss(model)
        if head == "basis_in_out":
            emb = BasisEmbedding(args.vocab, args.hidden, args.num_basis, args.clusters, device=args.device,
                                 dtype=dtype)
            model.set_input_embeddings(with_random_codes(emb, args.clusters))
    elif head == "no_head":
        model.set_output_embeddings(torch.nn.Identity())  # never called: the loss stops at the last hidden state
    elif head == "dense_liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
    return model.train()


LOOPS = {"plain": torch.bfloat16, "compiled": torch.bfloat16, "trainer": torch.bfloat16,
         "trainer_fp32": torch.float32}  # loop -> weight dtype


PARALLEL = ("ddp", "fsdp2")


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def wrap(model: torch.nn.Module, args) -> torch.nn.Module:
    """The model the loop trains: itself in one process, else DDP or FSDP2 over the processes."""
    if world_size() == 1:
        return model
    if args.parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
    return fully_shard_compressed(model)


def random_batches(args) -> list[torch.Tensor]:
    g = torch.Generator(device=args.device).manual_seed(rank())  # each process its own batches
    return [torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device, generator=g) for _ in range(4)]


def model_loss(model: torch.nn.Module, head: str = "dense"):
    if head == "no_head":
        return lambda ids: model.model(input_ids=ids).last_hidden_state.float().square().mean()
    return lambda ids: model(input_ids=ids, labels=ids).loss


def time_plain_loop(model: torch.nn.Module, args, loss_fn=None) -> tuple[float, float]:
    """ms per step (CUDA events over args.steps steps after args.warmup; wall clock on CPU) and the last step's loss.
    `loss_fn(ids)` (default `model_loss(model)`) may be compiled: the warm-up steps then compile it."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = random_batches(args)
    loss_fn = loss_fn or model_loss(model)

    def step(i):
        ids = batches[i % len(batches)]
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(i)
    synchronize(args.device)
    if args.device == "cpu":
        start = time.perf_counter()
        for i in range(args.steps):
            loss = step(i)
        return (time.perf_counter() - start) * 1e3 / args.steps, loss.item()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(args.steps):
        loss = step(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / args.steps, loss.item()


def time_compiled_loop(model: torch.nn.Module, args, head: str = "dense") -> tuple[float, float, dict]:
    """time_plain_loop with the model's loss compiled, and what dynamo did over the whole run (compilation included):
    graph breaks (each splits the step into more graphs and leaves the code between them eager), recompiles (each a
    new compilation inside the run; none is expected, every batch has the same shape) and graphs compiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ms, loss = time_plain_loop(model, args, torch.compile(model_loss(model, head)))
    dynamo = {"graph_breaks": sum(counters["graph_break"].values()),
              "recompiles": sum(counters["recompiles"].values()),
              "graphs": counters["stats"]["unique_graphs"]}
    return ms, loss, dynamo


def time_trainer(model: torch.nn.Module, args) -> tuple[float, float]:
    """ms per step of transformers.Trainer (bf16=True, its default optimizer and clipping) and its mean train loss.

    Timed by wall clock between the end of step args.warmup and the end of the last step, each after a
    synchronize: the Trainer's own host work (data loading, clipping, scheduler) is part of a training step.
    """
    import tempfile

    import transformers

    class StepTimer(transformers.TrainerCallback):
        def on_step_end(self, train_args, state, control, **kwargs):
            if state.global_step in (args.warmup, args.warmup + args.steps):
                synchronize(args.device)
                if state.global_step == args.warmup:
                    if args.device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    self.start = time.perf_counter()
                else:
                    self.ms = (time.perf_counter() - self.start) * 1e3 / args.steps

    rows = [{"input_ids": ids, "labels": ids} for batch in random_batches(args) for ids in batch.cpu()]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        train_args = transformers.TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
            learning_rate=1e-4, bf16=True, report_to="none", save_strategy="no", logging_strategy="no",
            disable_tqdm=True, seed=0, use_cpu=args.device == "cpu",
        )
        trainer = transformers.Trainer(model=model, args=train_args, train_dataset=rows, callbacks=[timer])
        loss = trainer.train().training_loss
        del trainer
    return timer.ms, loss


def run(head: str, loop: str, args) -> dict:
    if head == "no_head" and (loop not in ("plain", "compiled") or world_size() > 1):
        raise ValueError("--heads no_head runs in the plain and compiled loops of one process only")
    model = build(head, args, LOOPS[loop])
    params = sum(p.numel() for p in model.parameters())
    dynamo = {}
    trained = wrap(model, args)
    if loop == "compiled":
        ms, loss, dynamo = time_compiled_loop(trained, args, head)
    elif loop == "plain":
        ms, loss = time_plain_loop(trained, args, model_loss(trained, head))
    else:
        ms, loss = time_trainer(trained, args)
    # Every process: its step time and peak; the slowest step and the largest peak count.
    peak = torch.cuda.max_memory_allocated() / GiB if args.device == "cuda" else float("nan")
    stats = torch.tensor([ms, peak], device=args.device)
    if world_size() > 1:
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
    ms, peak = stats.tolist()
    result = {
        "loop": loop, "head": head, "params": params, "step_ms": ms,
        "tokens_per_s": world_size() * args.batch * args.seq / ms * 1e3,
        "peak_gib": peak if args.device == "cuda" else None, "loss": loss,
        "processes": world_size(), "parallel": args.parallel if world_size() > 1 else None, **dynamo,
    }
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="dense,dense_liger,basis,basis_in_out")
    p.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated, of {list(LOOPS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help=f"smoke-test sizes {TINY} (explicit flags still win)")
    p.add_argument("--vocab", type=int, default=None, help="default 128256")
    p.add_argument("--batch", type=int, default=None, help="default 8")
    p.add_argument("--seq", type=int, default=None, help="default 2048")
    p.add_argument("--hidden", type=int, default=None, help="default 768 (attention heads of 64)")
    p.add_argument("--layers", type=int, default=None, help="default 12")
    p.add_argument("--num-basis", type=int, default=None, help="default 8")
    p.add_argument("--clusters", type=int, default=None, help="default 384")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (compiled loop: at least 2)")
    p.add_argument("--steps", type=int, default=None, help="default 10")
    p.add_argument("--out", default=None)
    p.add_argument("--ce-config", default=None, help="JSON of Triton launcher configs (benchmark_basis_ce.py --tune)")
    p.add_argument("--num-processes", type=int, default=1, help="GPUs (one process each, relaunched with torchrun)")
    p.add_argument("--parallel", default="ddp", help=f"with --num-processes > 1: one of {list(PARALLEL)}")
    args = p.parse_args()
    defaults = {"vocab": 128256, "batch": 8, "seq": 2048, "hidden": 768, "layers": 12, "num_basis": 8, "clusters": 384,
                "warmup": 3, "steps": 10}
    for key, value in (TINY if args.tiny else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if "compiled" in args.loops.split(","):
        args.warmup = max(args.warmup, 2)  # compilation of the forward and backward graphs stays out of the timing
    if args.num_processes < 1:
        p.error(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.parallel not in PARALLEL:
        p.error(f"--parallel must be one of {list(PARALLEL)}, got {args.parallel!r}")
    if args.num_processes > 1 and args.loops != "plain":
        p.error(f"--num-processes > 1 times the plain loop only: pass --loops plain (got {args.loops!r})")
    if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:  # relaunch: one process per GPU
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(args.num_processes), __file__, *sys.argv[1:]]
        sys.exit(subprocess.call(command))
    if args.num_processes > 1:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl")
        if world_size() != args.num_processes:
            p.error(f"--num-processes {args.num_processes} but torchrun started {world_size()} processes")
    if args.ce_config:
        from benchmarks.benchmark_basis_ce import apply_ce_config

        apply_ce_config(json.loads(Path(args.ce_config).read_text())["tuned"])
    loops = args.loops.split(",")
    if unknown := [loop for loop in loops if loop not in LOOPS]:
        p.error(f"--loops: unknown {unknown}; allowed: {list(LOOPS)}")
    name = device_name(args.device)
    results = []
    for loop in loops:
        for head in args.heads.split(","):
            try:
                r = run(head, loop, args)
            except Exception as e:  # noqa: BLE001 - e.g. liger-kernel missing
                r = {"loop": loop, "head": head, "error": f"{type(e).__name__}: {e}"[:300]}
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            results.append(r)
            if rank() == 0:
                print(json.dumps(r), flush=True)
    if rank() != 0:
        torch.distributed.destroy_process_group()
        return
    gpus = f"{world_size()} GPUs ({args.parallel}), batch {args.batch} x {args.seq} each" if world_size() > 1 else (
        f"batch {args.batch} x {args.seq}")
    lines = [f"device: {name}; Llama {args.layers} x {args.hidden}, V={args.vocab}, {gpus}, AdamW",
             f"{'loop':>12} | {'head':>12} | {'tokens/s':>10} | {'step ms':>8} | {'peak GiB':>8} | vs dense"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['loop']:>12} | {r['head']:>12} | failed: {r['error']}")
            continue
        dense = next((d for d in results if d["loop"] == r["loop"] and d["head"] == "dense" and "tokens_per_s" in d),
                     None)
        ratio = f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}x" if dense else "-"
        peak = f"{r['peak_gib']:8.2f}" if r["peak_gib"] is not None else f"{'-':>8}"
        dynamo = (f" | graph breaks {r['graph_breaks']}, recompiles {r['recompiles']}, graphs {r['graphs']}"
                  if "graphs" in r else "")
        lines.append(f"{r['loop']:>12} | {r['head']:>12} | {r['tokens_per_s']:10.0f} | {r['step_ms']:8.1f} | "
                     f"{peak} | {ratio}{dynamo}")
    table = "\n".join(lines)
    print(table)
    prefix = f"train_throughput_{world_size()}x-{args.parallel}" if world_size() > 1 else "train_throughput"
    out = Path(args.out) if args.out else result_path(prefix, args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                               "ce_config_override": args.ce_config,
                               "setting": vars(args), "results": results, "table": table}, indent=2) + "\n")
    print(f"wrote {out}")
    if world_size() > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
