#!/usr/bin/env python
"""Plots and a table from the recipes' results.json files (matplotlib: `pip install -e ".[plot]"`).

    python recipes/plot_results.py curves RUN.json [RUN.json ...] -o curves.png   # validation perplexity per epoch
    python recipes/plot_results.py bytes recipes/results/ptb_*40ep*.json recipes/results/ptb_branch*.json \
        -o ppl_vs_bytes.png                                                        # test perplexity vs bytes
    python recipes/plot_results.py table RUN.json [RUN.json ...]                   # the same runs as a Markdown table

A run's epochs count across its phases (dense, then compressed); a run continued from another run's epoch checkpoint
(its results.json names it under "branch_of") starts at that epoch, so every curve is on the full schedule's axis.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["epoch_curve", "load", "main", "table"]


def load(path: str) -> dict:
    """A training run's results.json; ValueError for any other JSON (heal.py's results.json has no epochs to plot:
    recipes/heal_sweep.sh tabulates those)."""
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    if not isinstance(run, dict) or "log_history" not in run or "test_perplexity" not in run:
        raise ValueError(f"{path} is not the results.json of a training run (train_ptb.py / train_wikitext.py)")
    run.setdefault("run_name", os.path.splitext(os.path.basename(path))[0])
    return run


def epoch_curve(run: dict) -> tuple[list[float], list[float]]:
    """(epochs, validation perplexities) of the per-epoch evaluations, epochs counted on the whole schedule."""
    offset = float(run.get("branch_of", {}).get("epoch", 0))
    epochs, values, phase, phase_start, last = [], [], None, offset, offset
    for entry in run["log_history"]:
        if "eval_perplexity" not in entry or "epoch" not in entry:
            continue
        if entry.get("phase") != phase:  # each phase's Trainer counts its epochs from 0
            phase, phase_start = entry.get("phase"), last
        epoch = phase_start + float(entry["epoch"])
        if epochs and epoch == epochs[-1]:  # the Trainer's closing evaluation repeats the last epoch's
            continue
        epochs.append(epoch)
        values.append(float(entry["eval_perplexity"]))
        last = epoch
    return epochs, values


def _width(run: dict) -> str:
    model = run["args"]["model"]
    return f"{model['nlayers']} x {model['nhid'] if run['architecture'] == 'lstm_lm' else model['emsize']}"


def _setting(run: dict) -> str:
    comp = run["args"]["compression"]
    if run["compression"] == "basis":
        what = f"basis {comp['basis_modules']} {comp['num_basis']} x {comp['num_clusters']}"
    elif run["compression"] == "quant":
        what = f"quant {comp['basis_modules']} {comp['nbit']}-bit"
    elif comp["basis_optimizer"] == "adam":
        what = f"dense, Adam {comp['basis_modules']}"
    else:
        what = "dense"
    branch, switch = run.get("branch_of") or {}, run.get("switch") or {}
    epoch = branch.get("epoch") or comp["dense_warmup_epochs"]
    if comp.get("pq_aware_epochs"):  # older results.json files lack the field
        what += f", PQ-aware from {epoch - comp['pq_aware_epochs']:g}"
    lr = comp["compressed_learning_rate"] or branch.get("learning_rate") or switch.get("learning_rate")
    kd = run.get("distillation") or {}  # --distill_from: trained on the teacher's soft targets too
    # the plateau schedule's patience, where a run changed the recipes' 0 (ptb_distill_sweep.sh's PATIENCE)
    patience = ((run["args"].get("training") or {}).get("lr_scheduler_kwargs") or {}).get("patience", 0)
    return (what + (f", switch at {epoch:g}" if epoch else "") + (f" (lr {lr:.3g})" if epoch and lr else "")
            + (f", lr patience {patience}" if patience else "")
            + (f", distilled (alpha {kd['alpha']:g}, tau {kd['temperature']:g})" if kd else ""))


def table(runs: list[dict]) -> str:
    """Markdown: one row a run, perplexities against the first plain dense run of the same model width (not a
    branch, not switched, not distilled)."""
    dense = {}
    for run in runs:
        if run["compression"] == "none" and not run.get("branch_of") and not run.get("distillation") and not run[
                "args"]["compression"]["dense_warmup_epochs"]:
            dense.setdefault(_width(run), run)
    rows = ["| run | model | setting | valid | test | vs dense (test) | emb + head bytes | ratio |",
            "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        ref = dense.get(_width(run))
        gap = f"{100 * (run['test_perplexity'] / ref['test_perplexity'] - 1):+.1f}%" if ref else "-"
        rows.append(f"| `{run['run_name']}` | {_width(run)} | {_setting(run)} | {run['eval_perplexity']:.2f} | "
                    f"{run['test_perplexity']:.2f} | {gap} | {run['emb_head_bytes_after'] / 1e6:.2f} MB | "
                    f"{run['compression_ratio']:.1f}x |")
    return "\n".join(rows)


def _plot_curves(runs: list[dict], ax) -> None:
    for run in runs:
        epochs, values = epoch_curve(run)
        ax.plot(epochs, values, marker=".", label=run["run_name"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _plot_bytes(runs: list[dict], ax) -> None:
    markers = {"none": "o", "basis": "s", "quant": "^"}
    for width in sorted({_width(run) for run in runs}):
        for kind, marker in markers.items():
            group = [r for r in runs if _width(r) == width and r["compression"] == kind]
            if group:
                ax.scatter([r["emb_head_bytes_after"] / 1e6 for r in group], [r["test_perplexity"] for r in group],
                           marker=marker, label=f"{width} {kind}")
                for r in group:
                    ax.annotate(_setting(r), (r["emb_head_bytes_after"] / 1e6, r["test_perplexity"]), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("embedding + output layer bytes (MB)")
    ax.set_ylabel("test perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("curves", "bytes", "table"))
    parser.add_argument("results", nargs="+", help="results.json files written by the recipes")
    parser.add_argument("-o", "--output", help="PNG to write (curves, bytes)")
    args = parser.parse_args(argv)
    try:
        runs = [load(path) for path in args.results]
    except ValueError as err:
        parser.error(str(err))
    if args.what == "table":
        print(table(runs))
        return 0
    if not args.output:
        parser.error(f"{args.what} needs -o/--output PNG")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_results.py needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(9, 6))
    (_plot_curves if args.what == "curves" else _plot_bytes)(runs, ax)
    fig.tight_layout()
    tmp = args.output + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, args.output)  # never a half-written PNG under the real name
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
