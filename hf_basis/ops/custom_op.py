"""How hf_basis registers its ops: PyTorch custom ops for tracing, the same functions called directly in eager mode.

Each op (`torch.ops.hf_basis.<name>`) is a `torch.library.custom_op` with a fake implementation and, when
differentiable, `register_autograd`: dynamo (torch.compile), AOTAutograd, inductor and torch.export treat it as one
opaque node instead of tracing (and breaking on) the Triton launches, caches and `out=` writes inside it.

Going through the op dispatcher costs host time, though: measured on CPU, ~40-80 us per call (a forward + backward of
the basis head 0.46 -> 0.77 ms), which is what paces small eager calls on a GPU. So the callable returned here runs the
op only while something traces (`torch.compiler.is_compiling()`: dynamo, export, and AOTAutograd tracing a backward),
and otherwise the very same implementation, setup_context and backward through a plain autograd.Function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["hf_basis_op"]


def hf_basis_op(
    name: str, impl: Callable, fake: Callable, setup_context: Callable | None = None, backward: Callable | None = None
) -> Callable:
    """Register `impl` (fully type-annotated, returns new tensors) as `torch.ops.hf_basis.<name>` with `fake` as its
    fake implementation and, if `backward` is given, `register_autograd(backward, setup_context=setup_context)`.

    Returns a callable with impl's positional arguments: the op while tracing, impl (through an autograd.Function
    made of the same three functions when differentiable) in eager mode.
    """
    op = torch.library.custom_op(f"hf_basis::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if backward is None:
        eager = impl
    else:
        op.register_autograd(backward, setup_context=setup_context)
        def forward(ctx, *args):
            # forward(ctx, ...) rather than a separate setup_context staticmethod: Function.apply binds the arguments
            # of the latter with inspect.signature on every call (~40 us).
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        function = type(f"{name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward),
        })
        eager = function.apply

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else eager(*args)

    return call
