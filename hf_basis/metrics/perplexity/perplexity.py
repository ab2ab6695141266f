"""Corpus perplexity, exp(total NLL / total tokens), as an `evaluate` metric loadable offline by path.

    import evaluate, hf_basis.metrics
    metric = evaluate.load(hf_basis.metrics.PERPLEXITY)
    metric.add_batch(nll=[12.3, 40.1], num_tokens=[4, 11])     # any number of batches, any granularity
    metric.compute()  # {"perplexity": ..., "loss": ..., "num_tokens": 15}

Unlike the Hub's "perplexity" metric (which loads a model and averages per-text perplexities), this one takes what the
model already computed and weights every token equally, as language-modelling papers report PTB/WikiText numbers.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Token-level corpus perplexity: exp(sum of negative log-likelihoods / number of tokens)."""

_KWARGS_DESCRIPTION = """
Args:
    nll (list of float): summed negative log-likelihood, in nats, of each piece of text (a token, a row, a batch).
    num_tokens (list of int): number of predicted tokens each `nll` entry covers (same length as `nll`).
Returns:
    perplexity (float): exp(sum(nll) / sum(num_tokens)); inf when that overflows a float (a mean NLL above ~709.78).
    loss (float): sum(nll) / sum(num_tokens), the mean cross-entropy per token in nats.
    num_tokens (int): sum(num_tokens).
Examples:
    >>> metric = evaluate.load(hf_basis.metrics.PERPLEXITY)
    >>> metric.compute(nll=[2.0, 4.0], num_tokens=[1, 2])["perplexity"]  # exp(6 / 3)
    7.38905609893065
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, num_tokens):
        total_tokens = int(np.sum(num_tokens, dtype=np.int64))
        if total_tokens <= 0:
            raise ValueError("perplexity needs at least one token (sum(num_tokens) > 0)")
        loss = float(np.sum(nll, dtype=np.float64)) / total_tokens
        try:
            perplexity = math.exp(loss)
        except OverflowError:  # a diverged model: mean NLL above log(float max) ~ 709.78 nats
            perplexity = math.inf
        return {"perplexity": perplexity, "loss": loss, "num_tokens": total_tokens}
