"""Long work shows progress (issue 16, point 4): convert's k-means and head_input_moment draw transformers' tqdm
bars (off with transformers' disable_progress_bar, i.e. HF_HUB_DISABLE_PROGRESS_BARS=1) and log what is compressed."""

import logging

import torch
from transformers.utils import logging as hf_logging

import hf_basis
from hf_basis.compress.pq import product_quantize
from tiny_models import tiny_model


def test_product_quantize_reports_each_lloyd_iteration():
    calls = []
    weight = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    result = product_quantize(weight, 4, 8, progress=lambda done, total: calls.append((done, total)))
    assert [done for done, _ in calls] == list(range(1, result.iterations + 1))
    assert all(total == 25 for _, total in calls[:-1])  # max_iter until the last one
    assert calls[-1][1] == (result.iterations if result.iterations < 25 else 25)
    again = product_quantize(weight, 4, 8)  # the callback changes nothing
    assert torch.equal(again.codes, result.codes) and torch.equal(again.centroids, result.centroids)


def test_convert_shows_a_bar_per_fitted_layer_and_logs_it(capsys, caplog):
    model = tiny_model("llama", 300, 32, tie=False)
    with caplog.at_level(logging.INFO, logger="hf_basis"):
        hf_basis.convert(model, num_basis=4, num_clusters=16)
    err = capsys.readouterr().err
    assert "hf_basis k-means of model.embed_tokens (300 x 32)" in err
    assert "hf_basis k-means of lm_head (300 x 32)" in err
    assert "compressing lm_head (300 x 32) into 4 x 16 basis codes" in caplog.text

    tied = tiny_model("gpt2", 300, 32, tie=True)
    hf_basis.convert(tied, num_basis=4, num_clusters=16)
    bars = capsys.readouterr().err.split("\n")  # one line per bar (tqdm redraws it with \r)
    assert [("transformer.wte" in b) for b in bars if "hf_basis k-means of" in b] == [True]  # one codebook, once

    hf_logging.disable_progress_bar()
    try:
        hf_basis.convert(tiny_model("llama", 300, 32, tie=False), num_basis=4, num_clusters=16)
        batches = [torch.randint(0, 300, (2, 5)) for _ in range(3)]
        hf_basis.head_input_moment(tiny_model("llama", 300, 32, tie=False), batches)
    finally:
        hf_logging.enable_progress_bar()
    assert "hf_basis" not in capsys.readouterr().err


def test_head_input_moment_shows_a_bar_over_the_batches(capsys):
    batches = [torch.randint(0, 300, (2, 5)) for _ in range(3)]
    hf_basis.head_input_moment(tiny_model("llama", 300, 32, tie=False), batches)
    err = capsys.readouterr().err
    assert "hf_basis head_input_moment" in err and "3/3" in err
