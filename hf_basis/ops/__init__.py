"""Pure functions: PyTorch references, Triton kernels and their dispatch. Knows nothing about transformers."""
