"""LazyLogits: a basis output layer's logits, not computed until something needs their values.

In training, when the model was called with labels (hf_basis.integrations.fused_loss arms the head for that call),
BasisLinear returns a LazyLogits instead of the (..., V) logits. It is a torch.Tensor subclass with the right shape,
dtype, device and `requires_grad`, but no storage: it holds the head's inputs (hidden, centroids, codes, bias).

  * The fused loss (`hf_basis.integrations.fused_loss`) recognises it and computes the cross-entropy straight from
    those inputs (hf_basis.ops.basis_cross_entropy): the logits are never built.
  * Any other use (`logits.float()`, `logits[:, -1]`, `torch.softmax(logits)`, printing, ...) goes through
    `__torch_function__`, which computes the real logits once with the differentiable basis_linear, caches them, and
    runs the op on them: user code that touches the logits stays correct (it only loses the memory saving).
    Values first computed under `torch.no_grad()` (a token-accuracy metric) carry no graph: a later read with grad
    enabled computes them again with their graph (and caches that), so a loss term added afterwards (distillation,
    z-loss) still gets its gradients.
  * `clone()` stays lazy. DDP with `find_unused_parameters=True` (the Trainer's default) passes every output
    through `_DDPSink`, which clones each tensor under no_grad and then hands back the original of any output
    without a grad_fn (this one): materialising there would build the T x V logits on every step for nothing.
  * Final-logit soft-capping as Gemma 2 writes it (`logits / cap`, `torch.tanh`, `* cap`) is recognised and stays
    lazy, recording `softcap = cap`; any other op in between materialises the partially transformed value.
  * A plain dtype conversion (`logits.float()`, `logits.to(torch.float32)`) stays lazy too and only changes the
    dtype the logits report and are materialised in. Mixed precision needs it: under the Trainer's `bf16=True` /
    `fp16=True`, accelerate wraps the model's forward in `convert_outputs_to_fp32`, which calls `.float()` on every
    half-precision output after the loss was computed; materialising there would build the fp32 logits the fused
    loss exists to avoid (measured on an H100: +11 GiB and +14 ms per step for a 128k-word Llama head).

Metadata queries (shape, dtype, device, ...) never materialise.

Under torch.compile / torch.export (dynamo cannot trace the creation of this subclass) the armed head returns the real
logits instead, computed by the basis_linear custom op, with its inputs attached as a plain attribute
(`traced_head_logits`); the fused loss reads them back (`fused_head_inputs`) and computes the loss from the hidden
states as in eager mode. The logits then exist only if the compiled graph returns them: a compiled function that
returns the loss alone lets the compiler drop their computation.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.utils._pytree import tree_map

from hf_basis.ops.basis_linear import basis_linear

__all__ = ["LazyLogits", "fused_head_inputs", "traced_head_logits"]

_HEAD_INPUTS = "_hf_basis_head_inputs"

_T = torch.Tensor
# Reading these never needs the values.
_METADATA = {
    _T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.requires_grad.__get__, _T.ndim.__get__,
    _T.is_cuda.__get__, _T.layout.__get__, _T.is_leaf.__get__, _T.grad_fn.__get__, _T.grad.__get__,
    _T.is_sparse.__get__, _T.is_quantized.__get__, _T.is_meta.__get__,
    _T.size, _T.dim, _T.numel, _T.nelement, _T.__len__, _T.element_size, _T.is_floating_point, _T.is_complex,
    _T.get_device, _T.__hash__, _T._base.__get__,
}
_DIV = {_T.__truediv__, _T.div, torch.div, torch.true_divide, _T.true_divide}
_MUL = {_T.__mul__, _T.__rmul__, _T.mul, torch.mul, torch.multiply, _T.multiply}
_TANH = {torch.tanh, _T.tanh}
_FLOAT, _TO = _T.float, _T.to
_CLONE = {_T.clone, torch.clone}
_REGISTER_HOOK = _T.register_hook

# Soft-capping stages: logits -> logits / cap -> tanh(logits / cap) -> cap * tanh(logits / cap)
_PLAIN, _SCALED, _TANH_STAGE, _CAPPED = range(4)


class LazyLogits(torch.Tensor):
    """The (..., V) logits of a basis head, held as its inputs. See the module docstring.

    Attributes:
        hidden: (..., H) the head's input (the logits are computed in its dtype, then cast to `dtype`).
        centroids: (B, K, H / B) in hidden's dtype; codes: (V, B); bias: (V,) or None.
        softcap: the soft-capping value once `cap * tanh(logits / cap)` was applied, else None.
    """

    @staticmethod
    def __new__(cls, hidden, centroids, codes, bias=None, *, dtype=None, _stage=_PLAIN, _cap=None, _hooks=None):
        shape = (*hidden.shape[:-1], codes.shape[0])
        requires_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, centroids, bias)
        )
        self = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype or hidden.dtype, device=hidden.device, requires_grad=requires_grad
        )
        self.hidden, self.centroids, self.codes, self.bias = hidden, centroids, codes, bias
        self._stage, self._cap, self._value = _stage, _cap, None
        self._hooks = [] if _hooks is None else _hooks  # gradient hooks waiting for the logits (see register_hook)
        return self

    @property
    def softcap(self) -> float | None:
        return self._cap if self._stage == _CAPPED else None

    @property
    def fusable(self) -> bool:
        """True when the fused loss can stand in for these logits (plain, or completely soft-capped)."""
        return self._stage in (_PLAIN, _CAPPED) and self._value is None

    def materialize(self) -> torch.Tensor:
        """The real logits (a plain tensor, differentiable w.r.t. hidden / centroids / bias), computed once.

        Computed again, with their graph, when the cached values were computed under no_grad and grad is now on.
        """
        needs_graph = self.requires_grad and torch.is_grad_enabled()
        if self._value is None or (needs_graph and self._value.grad_fn is None):
            logits = basis_linear(self.hidden, self.centroids, self.codes, self.bias)  # plain tensors in, plain out
            if self._stage >= _SCALED:
                logits = logits / self._cap
            if self._stage >= _TANH_STAGE:
                logits = torch.tanh(logits)
            if self._stage == _CAPPED:
                logits = logits * self._cap
            self._value = logits.to(self.dtype)
            if self._value.grad_fn is not None:
                for hook in self._hooks:
                    self._value.register_hook(hook)
        return self._value

    def _register_hook(self, hook) -> "_PendingHook":
        """`register_hook` without building the logits: FSDP2 registers a pre-backward hook on every output of a
        sharded module. The hook waits here and is attached to the logits if they are ever computed with their
        graph (then a gradient reaches them); if only the fused loss uses them, no gradient ever flows through the
        logits and the hook has nothing to observe."""
        if self._value is not None and self._value.grad_fn is not None:
            return self._value.register_hook(hook)
        self._hooks.append(hook)
        return _PendingHook(self._hooks, hook)

    def _next(self, stage: int, cap: float | None, dtype: torch.dtype | None = None) -> "LazyLogits":
        return LazyLogits(self.hidden, self.centroids, self.codes, self.bias, dtype=dtype or self.dtype, _stage=stage,
                          _cap=cap, _hooks=self._hooks)  # a derived view of the same logits keeps their hooks

    def _cast(self, func, args, kwargs) -> "LazyLogits | None":
        """The same lazy logits (a new object) for `clone()`, or in another floating dtype if (func, args, kwargs)
        is a plain dtype conversion."""
        if self._value is not None:
            return None
        if func in _CLONE and len(args) == 1 and not kwargs:
            return self._next(self._stage, self._cap)
        if func is _FLOAT and len(args) == 1 and not kwargs:
            dtype = torch.float32
        elif func is _TO and len(args) == 2 and not kwargs and isinstance(args[1], torch.dtype):
            dtype = args[1]
        elif func is _TO and len(args) == 1 and kwargs.keys() == {"dtype"}:
            dtype = kwargs["dtype"]
        else:
            return None
        if not dtype.is_floating_point:
            return None
        return self if dtype == self.dtype else self._next(self._stage, self._cap, dtype)

    def _softcap_step(self, func, args, kwargs):
        """The next lazy stage if (func, args) continues `cap * tanh(logits / cap)`, else None."""
        if kwargs or self._value is not None:
            return None
        other = args[1] if len(args) == 2 else None
        scalar = isinstance(other, numbers.Real) and not isinstance(other, bool) and other > 0
        if self._stage == _PLAIN and func in _DIV and args[0] is self and scalar:
            return self._next(_SCALED, float(other))
        if self._stage == _SCALED and func in _TANH and len(args) == 1:
            return self._next(_TANH_STAGE, self._cap)
        if self._stage == _TANH_STAGE and func in _MUL and scalar and math.isclose(float(other), self._cap,
                                                                                    rel_tol=1e-6):
            return self._next(_CAPPED, self._cap)
        return None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is _REGISTER_HOOK and args and isinstance(args[0], LazyLogits) and len(args) == 2 and not kwargs:
            return args[0]._register_hook(args[1])
        if args and isinstance(args[0], LazyLogits):
            step = args[0]._softcap_step(func, args, kwargs)
            if step is None:
                step = args[0]._cast(func, args, kwargs)
            if step is not None:
                return step
        elif func in _MUL and len(args) == 2 and isinstance(args[1], LazyLogits) and not kwargs:
            step = args[1]._softcap_step(func, (args[1], args[0]), kwargs)  # cap * tanh(...)
            if step is not None:
                return step

        def unwrap(x):
            return x.materialize() if isinstance(x, LazyLogits) else x

        args, kwargs = tree_map(unwrap, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by code that bypasses __torch_function__ (below autograd): computing the logits here would
        # silently drop their gradient, so refuse loudly instead.
        raise RuntimeError(
            f"LazyLogits reached {func} below autograd; call `.materialize()` on the logits first, or disable "
            "the fused loss (hf_basis.integrations.fused_loss.uninstall_fused_loss(model))"
        )

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"LazyLogits(shape={tuple(self.shape)}, dtype={self.dtype}, softcap={self.softcap})"


class _PendingHook:
    """The handle `LazyLogits.register_hook` returns while the hook waits: `remove()` drops it."""

    def __init__(self, hooks: list, hook) -> None:
        self._hooks, self._hook = hooks, hook

    def remove(self) -> None:
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


def traced_head_logits(hidden, centroids, codes, bias=None) -> torch.Tensor:
    """The head's real logits, carrying (hidden, centroids, codes, bias) for the fused loss: the hand-off used while
    dynamo traces (torch.compile, torch.export), where a LazyLogits cannot be created."""
    logits = basis_linear(hidden, centroids, codes, bias)
    setattr(logits, _HEAD_INPUTS, (hidden, centroids, codes, bias))
    return logits


def fused_head_inputs(logits) -> tuple | None:
    """(hidden, centroids, codes, bias, softcap) that the fused loss can compute these logits' loss from, or None.

    A LazyLogits that is plain or completely soft-capped, or the logits of `traced_head_logits` exactly as the head
    returned them (an op on them makes a new tensor without the attribute; the attribute is cleared here, so a
    later in-place change cannot make a second read stale).
    """
    if isinstance(logits, LazyLogits):
        return (logits.hidden, logits.centroids, logits.codes, logits.bias, logits.softcap) if logits.fusable else None
    inputs = getattr(logits, _HEAD_INPUTS, None)
    if inputs is None:
        return None
    setattr(logits, _HEAD_INPUTS, None)  # cleared (dynamo traces setattr, not delattr)
    return (*inputs, None)
