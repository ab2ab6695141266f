"""recipes/plot_results.py: epochs on the whole schedule's axis, the Markdown table's gaps, and the PNGs."""

import os
import struct
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "recipes"))

import plot_results  # noqa: E402


def _run(name, compression, test, nbytes, log, **extra):
    comp = {"basis_modules": "both", "num_basis": 8, "num_clusters": 400, "nbit": 4, "basis_optimizer": "same",
            "dense_warmup_epochs": extra.pop("warmup", 0), "compressed_learning_rate": None}
    return {"run_name": name, "architecture": "lstm_lm", "compression": compression, "eval_perplexity": test + 5,
            "test_perplexity": test, "emb_head_bytes_after": nbytes, "compression_ratio": 16e6 / nbytes,
            "log_history": log, "args": {"model": {"nlayers": 2, "nhid": 200, "emsize": 200}, "compression": comp},
            **extra}


DENSE = _run("dense", "none", 100.0, 16e6, [{"epoch": 1.0, "eval_perplexity": 200.0},
                                            {"epoch": 2.0, "eval_perplexity": 150.0},
                                            {"epoch": 2.0, "eval_perplexity": 150.0}])  # closing re-evaluation
SWITCHED = _run("switched", "basis", 110.0, 1e6, [
    {"epoch": 1.0, "eval_perplexity": 200.0, "phase": "dense"},
    {"epoch": 1.0, "eval_perplexity": 180.0, "phase": "basis"},
    {"epoch": 2.0, "eval_perplexity": 170.0, "phase": "basis"}], warmup=1, switch={"learning_rate": 5.0})
BRANCH = _run("branch", "quant", 103.0, 2e6, [{"epoch": 1.0, "eval_perplexity": 160.0}],
              branch_of={"run": "dense.json", "epoch": 2, "learning_rate": 1.25})


def test_epochs_count_across_phases_and_from_the_branch_point():
    assert plot_results.epoch_curve(DENSE) == ([1.0, 2.0], [200.0, 150.0])
    assert plot_results.epoch_curve(SWITCHED) == ([1.0, 2.0, 3.0], [200.0, 180.0, 170.0])
    assert plot_results.epoch_curve(BRANCH) == ([3.0], [160.0])


# as ptb_distill_sweep.sh's BRANCH=1 students write it: started from a checkpoint (--init_from), no switch, no
# branch_of (the committed files add that by hand)
DISTILLED = _run("distilled", "none", 90.0, 16e6, [{"epoch": 1.0, "eval_perplexity": 95.0}],
                 distillation={"teacher": "t", "alpha": 0.5, "temperature": 1.0, "phases": "last"})
BRANCH_DISTILLED = dict(DISTILLED, run_name="branch_distilled",
                        branch_of={"run": "teacher.json", "epoch": 10, "learning_rate": 20.0})


def test_table_gaps_are_against_the_dense_run_of_the_same_width():
    rows = plot_results.table([DISTILLED, DENSE, SWITCHED, BRANCH]).splitlines()
    assert len(rows) == 6
    # a distilled dense run is not the reference, though listed first; its setting says how it was trained
    assert "| -10.0% |" in rows[2] and "| dense, distilled (alpha 0.5, tau 1) |" in rows[2]
    assert "| +10.0% |" in plot_results.table([DISTILLED, BRANCH_DISTILLED, DENSE, SWITCHED]).splitlines()[5]
    assert "dense, switch at 10 (lr 20), distilled (alpha 0.5, tau 1)" in plot_results.table([BRANCH_DISTILLED])
    patient = dict(BRANCH_DISTILLED, args=dict(BRANCH_DISTILLED["args"], training={
        "lr_scheduler_kwargs": {"factor": 0.25, "patience": 1, "threshold": 0.0}}))
    assert "dense, switch at 10 (lr 20), lr patience 1, distilled (alpha 0.5, tau 1)" in plot_results.table([patient])
    assert "| +10.0% |" in rows[4] and "basis both 8 x 400, switch at 1 (lr 5) |" in rows[4]
    assert "| +3.0% |" in rows[5] and "quant both 4-bit, switch at 2 (lr 1.25) |" in rows[5]


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("what", ["curves", "bytes"])
def test_plots_are_written(tmp_path, what):
    pytest.importorskip("matplotlib")
    import json

    paths = []
    for run in (DENSE, SWITCHED, BRANCH):
        paths.append(str(tmp_path / f"{run['run_name']}.json"))
        with open(paths[-1], "w") as f:
            json.dump(run, f)
    out = tmp_path / f"{what}.png"
    assert plot_results.main([what, *paths, "-o", str(out)]) == 0
    width, height = _png_size(out)
    assert width > 500 and height > 300
    assert not (tmp_path / f"{what}.png.tmp.png").exists()
    with pytest.raises(SystemExit):  # a plot needs somewhere to go
        plot_results.main([what, *paths])


def test_a_heal_results_file_is_refused_with_one_line(tmp_path, capsys):
    import json

    path = tmp_path / "heal_minilm.json"  # what recipes/heal.py writes: metrics before / after, no epochs
    path.write_text(json.dumps({"teacher_metric": {"sentence_cosine": 1.0}, "after_healing": {"sentence_cosine": 0.9},
                                "compression": {"method": "basis"}}))
    with pytest.raises(SystemExit):
        plot_results.main(["table", str(path)])
    assert "heal_minilm.json is not the results.json of a training run" in capsys.readouterr().err
