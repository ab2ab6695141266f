"""Where the kernel tests run: HF_BASIS_TEST_DEVICE=cuda runs them on a GPU for real; the default, cpu, runs the
Triton kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything defines a kernel).
"""

import os

import pytest
import torch

DEVICE = os.environ.get("HF_BASIS_TEST_DEVICE", "cpu")


def require_device() -> None:
    """Skip the calling test module when a GPU was asked for but none is present."""
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("HF_BASIS_TEST_DEVICE=cuda but no GPU", allow_module_level=True)
