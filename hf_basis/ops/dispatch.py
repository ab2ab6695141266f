"""One place that decides whether an op runs its Triton kernel or its PyTorch reference.

Triton runs on CUDA tensors when the `triton` package imports. `HF_BASIS_DISABLE_TRITON=1` forces the PyTorch path
everywhere (debugging, or comparing against the reference). float64 tensors always take the PyTorch path: the
kernels accumulate in float32, which would silently drop a float64 model's precision. Tests call the Triton entry points
directly on CPU tensors under `TRITON_INTERPRET=1`; the dispatch itself never sends CPU tensors to Triton.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["triton_available", "use_triton"]


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package can be imported (it is not installed on every platform)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels should handle these tensors (all on CUDA, none float64, Triton present, not disabled).

    The environment variable is read on every call so that tests and users can flip it at run time.
    """
    if os.environ.get("HF_BASIS_DISABLE_TRITON", "0") not in ("", "0"):
        return False
    return all(t.is_cuda and t.dtype != torch.float64 for t in tensors) and triton_available()
