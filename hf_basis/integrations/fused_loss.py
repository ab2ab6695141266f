"""Train converted causal LMs through the fused basis cross-entropy, without patching any architecture.

transformers' causal LMs all end the same way:

    logits = self.lm_head(hidden_states)                       # (B, L, V)
    loss = self.loss_function(logits, labels, vocab_size, **kwargs)   # ForCausalLMLoss; kwargs carry
                                                               # num_items_in_batch, shift_labels, ignore_index

`install_fused_loss(model)` (called by `hf_basis.convert`) hooks into exactly those two points:

1. A forward pre-hook on the model arms its BasisLinear head for the duration of a call that has `labels` (or
   `shift_labels`); a forward hook disarms it (also on errors). An armed head in training mode with grad enabled
   returns a `LazyLogits` (hf_basis.modules.lazy_logits): a storage-less tensor holding the head's inputs (under
   torch.compile / torch.export, which cannot create it: the real logits, carrying those inputs).
2. `model.loss_function` is replaced by `FusedCausalLMLoss`, which on a LazyLogits shifts the labels like
   ForCausalLMLoss and calls `hf_basis.ops.basis_cross_entropy` on the hidden states (`fused_head_inputs`; sum /
   num_items_in_batch when the Trainer passes it, mean over non-ignored tokens otherwise). Anything else (real
   logits, a LazyLogits that some code already materialised or transformed) goes to the original ForCausalLMLoss
   unchanged.

So evaluation, generation, `logits_to_keep`, calls without labels and eval mode all return real logits, and any code
that reads the lazy logits gets the real values (computed then: correct, just not fused). Gemma 2's final-logit
soft-capping (`logits / cap`, `tanh`, `* cap`) stays lazy and is fused (`softcap=cap` in the kernels).
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn

from hf_basis.modules.basis_linear import BasisLinear
from hf_basis.modules.lazy_logits import fused_head_inputs
from hf_basis.ops.basis_cross_entropy import basis_cross_entropy

__all__ = ["FusedCausalLMLoss", "install_fused_loss", "uninstall_fused_loss", "fused_loss_installed"]

logger = logging.getLogger(__name__)

_HANDLES = "_hf_basis_fused_loss_handles"
_LABELS_POSITION: dict[type, int | None] = {}


class FusedCausalLMLoss:
    """Drop-in for transformers' ForCausalLMLoss: fused when handed LazyLogits, the original otherwise.

    Same signature as ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
    shift_labels=None, **kwargs). A plain class (not a closure) so that models stay picklable / deep-copyable.
    """

    def __init__(self, original):
        self.original = original

    def __call__(self, logits, labels=None, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                 shift_labels=None, **kwargs):
        inputs = fused_head_inputs(logits)
        if inputs is not None:
            hidden, centroids, codes, bias, softcap = inputs
            if shift_labels is None:
                # Shift so that tokens < n predict n (ForCausalLMLoss's padding: the last position is ignored).
                shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            if shift_labels.shape == hidden.shape[:-1]:
                reduction = "mean" if num_items_in_batch is None else "sum"
                loss = basis_cross_entropy(
                    hidden, centroids, codes, bias, shift_labels.to(hidden.device),
                    ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                )
                if num_items_in_batch is not None:
                    if torch.is_tensor(num_items_in_batch):
                        num_items_in_batch = num_items_in_batch.to(loss.device)
                    loss = loss / num_items_in_batch
                return loss
        return self.original(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                             ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)

    def __repr__(self) -> str:
        return f"FusedCausalLMLoss(original={getattr(self.original, '__name__', self.original)!r})"


def _labels_position(model: nn.Module) -> int | None:
    """Index of `labels` among forward's positional parameters (for callers that pass it positionally)."""
    cls = type(model)
    if cls not in _LABELS_POSITION:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params]
        _LABELS_POSITION[cls] = names.index("labels") if "labels" in names else None
    return _LABELS_POSITION[cls]


def _has_labels(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None:
        return True
    pos = _labels_position(model)
    return pos is not None and len(args) > pos and args[pos] is not None


def _basis_heads(model: nn.Module) -> list[BasisLinear]:
    """The BasisLinear output layer, also when a wrapper holds it: PEFT's `modules_to_save=["lm_head"]` puts the
    head and its trainable copy inside a ModulesToSaveWrapper (arming both keeps whichever runs fused)."""
    head = model.get_output_embeddings()
    return [] if head is None else [m for m in head.modules() if isinstance(m, BasisLinear)]


def _arm(model: nn.Module, args: tuple, kwargs: dict) -> None:
    armed = model.training and torch.is_grad_enabled() and _has_labels(model, args, kwargs)
    for head in _basis_heads(model):
        head.lazy_logits = armed


def _disarm(model: nn.Module, args: tuple, kwargs: dict, output) -> None:
    for head in _basis_heads(model):
        head.lazy_logits = False


def fused_loss_installed(model: nn.Module) -> bool:
    return hasattr(model, _HANDLES)


def install_fused_loss(model: nn.Module) -> bool:
    """Route the training loss of a converted causal LM through the fused basis cross-entropy. Idempotent.

    Installs only where it is exact: the output layer is a BasisLinear and the model's loss is transformers'
    ForCausalLMLoss. Returns whether the fused loss is (now) installed.
    """
    if fused_loss_installed(model):
        return True
    if not hasattr(model, "get_output_embeddings") or not isinstance(model.get_output_embeddings(), BasisLinear):
        return False
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    original = getattr(model, "loss_function", None)
    if original is not ForCausalLMLoss:
        logger.info("hf_basis: %s's loss is %r, not ForCausalLMLoss; the fused basis loss is not installed",
                    type(model).__name__, original)
        return False
    model.loss_function = FusedCausalLMLoss(original)
    pre = model.register_forward_pre_hook(_arm, with_kwargs=True)
    post = model.register_forward_hook(_disarm, with_kwargs=True, always_call=True)
    object.__setattr__(model, _HANDLES, (pre, post))
    return True


def uninstall_fused_loss(model: nn.Module) -> None:
    """Undo install_fused_loss: the model computes real logits and the original loss again."""
    handles = getattr(model, _HANDLES, None)
    if handles is None:
        return
    for handle in handles:
        handle.remove()
    object.__delattr__(model, _HANDLES)
    loss = getattr(model, "_loss_function", None)
    if isinstance(loss, FusedCausalLMLoss):
        model.loss_function = loss.original
    for head in _basis_heads(model):
        head.lazy_logits = False
