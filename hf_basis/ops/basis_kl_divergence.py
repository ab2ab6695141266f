"""Distillation loss through a basis output layer: KL(teacher || student) without the T x V logits of either.

    P = centroid_scores(hidden, centroids)                         (B, K, T): one small bmm
    s[t, w] = bias[w] + sum_b P[b, code[w, b], t]                  the student's logits, one token chunk at a time
    z[t, w] = teacher_hidden[t] . teacher_weight[w] + teacher_bias[w]   the teacher's logits, same chunk
    p = softmax(z / tau), q = softmax(s / tau)

    loss[t] = tau^2 * sum_w p[t, w] (log p[t, w] - log q[t, w])      (Hinton et al. 2015; tau^2 keeps the gradient's
                                                                       scale independent of the temperature)
    dloss[t] / ds[t, w] = tau * (q[t, w] - p[t, w])

Reductions over the counted tokens (`mask`): "mean" (sum / number counted) or "sum". The loss is fp32.

The loss is a scalar, so the gradients are computed inside the forward, chunk by chunk of tokens (the per-chunk
student logits come from the decode op `basis_decode`, which runs the Triton kernels on CUDA, and its backward
scatters the chunk's logit gradient onto P), and the backward only multiplies them by the upstream gradient, as the
fused cross-entropy does. Memory: P, one chunk's (Tc, V) fp32 student and teacher logits and their softmaxes, and
the gradients of the inputs; never T x V. The teacher's logits are computed per chunk from its last hidden state, so
a teacher's full logits are never held either.
"""

from __future__ import annotations

import torch

from hf_basis.ops.basis_decode import basis_decode
from hf_basis.ops.basis_linear import centroid_scores, centroid_scores_backward

__all__ = ["basis_kl_divergence"]

REDUCTIONS = ("mean", "sum")
_CHUNK_ELEMENTS = 2**22  # fp32 logits per chunk and per temporary (16 MiB each; ~6 temporaries live at once)


def _chunk_kl(Pc, codes, bias, teacher_hidden_c, teacher_weight, teacher_bias, coef_c, tau, need_grad, need_bias):
    """KL of one token chunk: loss_c (Tc,) fp32 (tau^2 * KL per token, unweighted) and, if `need_grad`, the
    gradients (of sum_t coef_c[t] * loss_c[t]) of Pc (B, K, Tc) and, if `need_bias`, of bias (V,) (else None)."""
    with torch.enable_grad():
        Pc = Pc.detach().requires_grad_(need_grad)
        b = None if bias is None else bias.detach().requires_grad_(need_bias)
        s = basis_decode(Pc, codes, b)  # (Tc, V) raw student logits, in P's dtype
    with torch.no_grad():
        z = torch.nn.functional.linear(teacher_hidden_c, teacher_weight, teacher_bias).float() / tau  # (Tc, V)
        log_p = torch.log_softmax(z, dim=-1)
        del z
        log_q = torch.log_softmax(s.detach().float() / tau, dim=-1)
        p = log_p.exp()
        loss_c = (tau * tau) * (p * (log_p - log_q)).sum(dim=-1)
        if not need_grad:
            return loss_c, None, None
        del log_p
        g = log_q.exp_().sub_(p).mul_(tau * coef_c[:, None])  # dloss/ds = tau (q - p), weighted per token
        del p
    inputs = (Pc, b) if need_bias else (Pc,)
    grads = torch.autograd.grad(s, inputs, g.to(s.dtype))  # the decode's backward: scatter onto P (and bias)
    return loss_c, grads[0], grads[1] if need_bias else None


class BasisKLDivergenceFunction(torch.autograd.Function):
    """hidden (T, H), centroids (B, K, d), codes (V, B), bias (V,) or None, teacher_hidden (T, Ht),
    teacher_weight (V, Ht), teacher_bias (V,) or None, mask (T,) bool -> scalar fp32 loss. Gradients for hidden,
    centroids and bias are computed in the forward; the teacher's inputs get none."""

    @staticmethod
    def forward(ctx, hidden, centroids, codes, bias, teacher_hidden, teacher_weight, teacher_bias, mask, tau,
                reduction, chunk):
        T = hidden.shape[0]
        V = codes.shape[0]
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        need_grad = any(needs)
        count = mask.sum().clamp_min(1).float() if reduction == "mean" else torch.ones((), device=hidden.device)
        coef = mask.float() / count  # (T,) weight of each token in the reduced loss
        with torch.no_grad():
            P = centroid_scores(hidden.detach(), centroids.detach()).contiguous()  # (B, K, T)
        grad_P = torch.zeros_like(P, dtype=torch.float32) if needs[0] or needs[1] else None
        grad_bias = torch.zeros(V, device=hidden.device, dtype=torch.float32) if needs[2] else None
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        step = max(1, chunk or _CHUNK_ELEMENTS // max(V, 1))
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            loss_c, gP, gb = _chunk_kl(P[:, :, t0:t1], codes, bias, teacher_hidden[t0:t1], teacher_weight,
                                       teacher_bias, coef[t0:t1], tau, need_grad, needs[2])
            total += (loss_c * coef[t0:t1]).sum()
            if grad_P is not None:
                grad_P[:, :, t0:t1] = gP
            if gb is not None:
                grad_bias += gb
        if need_grad:
            gh, gc = (centroid_scores_backward(grad_P, hidden.detach(), centroids.detach(), needs[0], needs[1])
                      if grad_P is not None else (None, None))
            ctx.save_for_backward(gh, gc, None if grad_bias is None else grad_bias.to(bias.dtype))
        else:
            ctx.save_for_backward(None, None, None)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], grads[1], None, grads[2], None, None, None, None, None, None, None


def basis_kl_divergence(
    hidden: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    *,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher logits / tau) || softmax(student logits / tau)) per token, reduced over `mask`.

    Args:
        hidden: (..., H) the student's activations entering its basis output layer.
        centroids: (B, K, H / B), codes: (V, B), bias: (V,) or None: the student's basis output layer.
        teacher_hidden: (..., Ht) the teacher's activations entering its output layer (hidden's leading shape).
        teacher_weight: (V, Ht), teacher_bias: (V,) or None: the teacher's dense output layer. No gradient.
        mask: (...) bool, the tokens that count (e.g. the attention mask); None counts every token.
        temperature: tau > 0, softens both distributions.
        reduction: "mean" (over counted tokens; 0 when none count) or "sum".
        chunk_tokens: tokens per chunk (default: 2**22 logits per chunk).

    Returns the fp32 scalar loss. Gradients reach hidden, centroids and bias; neither side's T x V logits are ever
    built (see the module docstring).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if centroids.dim() != 3:
        raise ValueError(f"centroids must be (num_basis, num_clusters, sub_dim), got {tuple(centroids.shape)}")
    B, K, d = centroids.shape
    V = codes.shape[0]
    if hidden.shape[-1] != B * d:
        raise ValueError(f"hidden has {hidden.shape[-1]} features but the codebook expects {B * d}")
    if teacher_weight.dim() != 2 or teacher_weight.shape[0] != V:
        raise ValueError(f"teacher_weight must be (vocab={V}, teacher hidden), got {tuple(teacher_weight.shape)}")
    if teacher_hidden.shape[:-1] != hidden.shape[:-1] or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(f"teacher_hidden must be {(*hidden.shape[:-1], teacher_weight.shape[1])}, "
                         f"got {tuple(teacher_hidden.shape)}")
    if mask is None:
        mask = torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
    if mask.shape != hidden.shape[:-1]:
        raise ValueError(f"mask must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(mask.shape)}")
    if centroids.dtype != hidden.dtype:
        centroids = centroids.to(hidden.dtype)  # differentiably, as basis_cross_entropy does
    teacher_hidden = teacher_hidden.detach().reshape(-1, teacher_weight.shape[1]).to(teacher_weight.dtype)
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    return BasisKLDivergenceFunction.apply(
        hidden.reshape(-1, B * d), centroids, codes, bias, teacher_hidden, teacher_weight.detach(), teacher_bias,
        mask.reshape(-1).bool(), float(temperature), reduction, chunk_tokens,
    )
