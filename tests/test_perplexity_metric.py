"""The shipped `evaluate` perplexity metric on diverged models (issue 15, item 19)."""

import math

import evaluate

import hf_basis.metrics


def test_perplexity_overflow_is_inf_not_an_error():
    metric = evaluate.load(hf_basis.metrics.PERPLEXITY)
    result = metric.compute(nll=[710.0 * 3], num_tokens=[3])  # exp(710) exceeds the largest float
    assert result["perplexity"] == math.inf and result["loss"] == 710.0
    below = metric.compute(nll=[709.0], num_tokens=[1])
    assert below["perplexity"] == math.exp(709.0)
