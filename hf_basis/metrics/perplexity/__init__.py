# Makes the metric folder part of the installed package; evaluate.load() reads perplexity.py by path.
