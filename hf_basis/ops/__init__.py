"""Pure functions: PyTorch references, Triton kernels and their dispatch. Knows nothing about transformers.

`hf_basis.ops.basis_cross_entropy` is the fused loss function itself (as Cut Cross-Entropy exports
`linear_cross_entropy`): it shadows its module's name here, so reach the module through
`importlib.import_module("hf_basis.ops.basis_cross_entropy")` or `from hf_basis.ops.basis_cross_entropy import ...`.
"""

from hf_basis.ops.basis_cross_entropy import basis_cross_entropy

__all__ = ["basis_cross_entropy"]
