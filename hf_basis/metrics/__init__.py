"""`evaluate` metric modules shipped with hf_basis, loadable offline by path (no Hub):

    import evaluate, hf_basis.metrics
    perplexity = evaluate.load(hf_basis.metrics.PERPLEXITY)
    perplexity.compute(nll=[sum of token NLLs of each text], num_tokens=[tokens of each text])
"""

import os

__all__ = ["PERPLEXITY"]

PERPLEXITY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "perplexity")
