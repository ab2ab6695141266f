"""DecodedWeight: what `.weight` of a compressed module returns, a dense tensor that cannot be written to.

Libraries written for nn.Embedding / nn.Linear read `layer.weight` (its shape, device, rows) and use it to freeze
the layer (`layer.weight.requires_grad_(False)`). A compressed module has no dense weight: `.weight` decodes one on
every access. Writing into that copy (`emb.weight.data[5] = v`, `weight.copy_(...)`, `nn.init.normal_(weight)`)
would change nothing, silently, so every in-place write raises instead. Freezing goes through to the tensors that
do train: `weight.requires_grad` reads and sets the `requires_grad` of the module's centroids (none for the frozen
SmallFry modules, which refuse `True`).

Everything else behaves like a plain tensor; results of operations are plain tensors (e.g. `weight.clone()` is an
ordinary, writable copy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DecodedWeight"]

# In-place operator methods whose names do not end in a single "_" (those are caught by name).
_INPLACE_DUNDERS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
                            "lshift", "rshift")
) | {"__setitem__"}  # fmt: skip


def _writes_first_argument(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))


class DecodedWeight(torch.Tensor):
    """A decoded (rows, width) weight of `owner`; in-place writes raise, `requires_grad` is the trainable tensors'.

    Built by `DecodedWeight.wrap(tensor, owner, trainable)`; it shares `tensor`'s data and autograd graph.
    """

    _owner: nn.Module
    _trainable: tuple[nn.Parameter, ...]

    @staticmethod
    def wrap(tensor: torch.Tensor, owner: nn.Module, trainable: tuple[nn.Parameter, ...]) -> DecodedWeight:
        """`tensor` seen as the weight of `owner`, whose trainable tensors behind it are `trainable` (may be empty)."""
        weight = tensor.as_subclass(DecodedWeight)
        weight._owner = owner
        weight._trainable = tuple(trainable)
        # Initialised already (from a dense layer or a checkpoint): transformers' guarded init functions
        # (`transformers.initialization.normal_` etc., e.g. T5's `_init_weights` on `shared.weight` while loading)
        # skip it instead of writing into it.
        weight._is_hf_initialized = True
        return weight

    def _read_only_error(self) -> RuntimeError:
        train = "train its centroids (`codebook.centroids`) or " if self._trainable else ""
        return RuntimeError(
            f"{type(self._owner).__name__}.weight is decoded from the compressed table on every access, so writing "
            f"to it would change nothing; it is read-only. To change the layer, {train}call model.dequantize() to "
            "get a dense nn.Embedding / nn.Linear, edit that, and convert again."
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # The tensor an in-place function writes: its first argument (`nn.init.*_` pass it as `tensor=`).
        written = [args[0] if args else kwargs.get("tensor")] if _writes_first_argument(func) else []
        out = kwargs.get("out")
        written += list(out) if isinstance(out, (tuple, list)) else [out]
        for target in written:
            if isinstance(target, DecodedWeight):
                raise target._read_only_error()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)  # plain tensors out: copies and views are ordinary tensors

    # ------------------------------------------------------------------ freezing
    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        """Whether the module's trainable tensors behind this weight (its centroids) require grad."""
        return any(p.requires_grad for p in self._trainable)

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if not self._trainable:
            self._owner.requires_grad_(bool(value))  # a frozen SmallFry module refuses True, with its own message
            return
        for p in self._trainable:
            p.requires_grad_(bool(value))

    def requires_grad_(self, requires_grad: bool = True) -> DecodedWeight:  # type: ignore[override]
        self.requires_grad = requires_grad
        return self

    # ------------------------------------------------------------------ .data
    @property
    def data(self) -> DecodedWeight:  # type: ignore[override]
        with torch._C.DisableTorchFunctionSubclass():
            detached = torch.Tensor.detach(self)
        return DecodedWeight.wrap(detached, self._owner, self._trainable)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        raise self._read_only_error()

    def __reduce_ex__(self, protocol):
        # Pickled / saved as the plain tensor it holds, without the module it came from.
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.detach(self).__reduce_ex__(protocol)
