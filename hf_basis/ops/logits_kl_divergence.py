"""Distillation loss between two sets of logits: tau^2 KL(softmax(teacher / tau) || softmax(student / tau)).

The dense counterpart of `basis_kl_divergence` (same formula, reductions and fp32 result), for a student whose
logits exist anyway: a dense output layer, or one whose T x V logits are affordable. Hinton et al. 2015: the tau^2
factor keeps the gradient's scale independent of the temperature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["logits_kl_divergence"]

REDUCTIONS = ("mean", "sum")


def logits_kl_divergence(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher_logits / tau) || softmax(logits / tau)) per position, reduced over `mask`.

    Args:
        logits: (..., V) the student's logits; the gradient flows to them.
        teacher_logits: (..., V) the teacher's logits, same shape; no gradient.
        mask: (...) bool, the positions that count; None counts every position.
        temperature: tau > 0, softens both distributions.
        reduction: "mean" (over counted positions; 0 when none count) or "sum".

    Returns the fp32 scalar loss.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher_logits must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    if mask is None:
        mask = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask must have the logits' leading shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(mask.shape)}")
    tau = float(temperature)
    log_q = F.log_softmax(logits.float() / tau, dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    per_position = (tau * tau) * F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    mask = mask.bool()
    total = torch.where(mask, per_position, 0.0).sum()
    return total if reduction == "sum" else total / mask.sum().clamp_min(1)
