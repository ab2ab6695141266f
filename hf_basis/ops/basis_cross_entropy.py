"""Cross-entropy through a basis (product-quantized) output layer without ever building the T x V logits.

    P = centroid_scores(hidden, centroids)                      (B, K, T): one small bmm
    l[t, w] = bias[w] + sum_b P[b, code[w, b], t]               never stored for all (t, w) at once
    l'      = cap * tanh(l / cap)  if softcap else l            (Gemma-style final logit soft-capping)
    lse[t]  = log sum_w exp(l'[t, w])                           fp32, streamed over the vocabulary

Per non-ignored token t with target y (eps = label_smoothing, z = z_loss, V = vocabulary size):

    loss[t] = (1 - eps) * (lse[t] - l'[t, y]) + eps * (lse[t] - sum_w l'[t, w] / V) + z * lse[t]**2

which is exactly `F.cross_entropy(l', y, label_smoothing=eps)` per token (PyTorch's definition: the smoothing term is
the mean over classes of -log softmax) plus the z-loss of PaLM / Liger's `lse_square_scale` (z * lse^2 per
non-ignored token, reduced like the cross-entropy). Ignored tokens (label == ignore_index) contribute 0 and are not
counted. Reductions: "mean" (sum / number of non-ignored tokens; NaN when there are none, as in PyTorch), "sum",
"none" (per token, labels' shape). The loss is returned in fp32.

Backward: with s[t] the upstream gradient of token t (the reduction folded in),

    dloss/dl[t, w] = (s (1 + 2 z lse) softmax'[t, w] - s (1 - eps) [w = y] - s eps / V) * (1 - tanh^2 if softcap)

recomputed chunk by chunk of tokens and scattered onto grad_P (then the bmm's backward gives hidden and centroids
their gradients; grad_bias is the sum over tokens). For a scalar loss this runs inside the forward with s = 1 (or
1 / count) and the backward multiplies by the upstream gradient (see `basis_cross_entropy`).
Two implementations share this file's custom op (`torch.ops.hf_basis.basis_cross_entropy`, with autograd and a fake
implementation, so torch.compile / torch.export trace through it):
  "triton"  basis_cross_entropy_triton.py: forward = an online-lse kernel + a per-token finalize kernel; backward =
            per token chunk a gradient kernel writing dloss/dl transposed (V, Tc), then the decode backward's
            deterministic segment sum. CUDA. A large scalar loss whose gradients the forward computes and whose bias
            needs none takes one gather pass instead of these two (`_one_pass`, forward_stats_one_pass_triton).
  "torch"   the PyTorch reference below, same contract (forward_stats_reference / ce_grad_reference): builds one
            chunk's (Tc, V) fp32 logits at a time. The CPU path and the tests' oracle.
Both paths use the same two-step contract: forward -> stats (4, T) [lse, 1 + 2 z lse, 1 - eps, eps / V; 0 where a
token is not counted] and per-token loss; backward -> grad_P, grad_bias from stats and the upstream gradient.
Memory: P (B*K*T), stats, and (Triton) one V x Tc gradient buffer of at most 256 MiB; never T x V.
"""

from __future__ import annotations

import torch

from hf_basis.ops.basis_decode import basis_decode_backward_reference, basis_decode_reference
from hf_basis.ops.basis_linear import centroid_scores, centroid_scores_backward
from hf_basis.ops.custom_op import hf_basis_op
from hf_basis.ops.dispatch import use_triton

__all__ = ["basis_cross_entropy", "lse_reference", "forward_stats_reference", "ce_grad_reference"]

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "torch")
_REFERENCE_CHUNK_ELEMENTS = 2**24  # fp32 logits of one reference chunk: 64 MiB


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def _reference_chunk(T: int, V: int, chunk: int | None) -> int:
    return max(1, chunk or _REFERENCE_CHUNK_ELEMENTS // max(V, 1))


def _chunk_logits(P, codes, bias, t0, t1):
    """fp32 logits (t1 - t0, V) of one token chunk."""
    return basis_decode_reference(P[:, :, t0:t1].float(), codes, None if bias is None else bias.float())


def lse_reference(
    P: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None, softcap: float | None = None,
    with_sum: bool = False, chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch: lse (T,) fp32 of the (soft-capped) logits and, if `with_sum`, their sum over the vocabulary (T,)."""
    B, K, T = P.shape
    V = codes.shape[0]
    lse = torch.empty(T, device=P.device, dtype=torch.float32)
    total = torch.empty(T, device=P.device, dtype=torch.float32) if with_sum else None
    step = _reference_chunk(T, V, chunk)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        logits = _softcap(_chunk_logits(P, codes, bias, t0, t1), softcap)
        lse[t0:t1] = torch.logsumexp(logits, dim=1)
        if with_sum:
            total[t0:t1] = logits.sum(dim=1)
    return lse, total


def forward_stats_reference(
    P: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int = -100,
    label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None, chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch: the forward's per-token quantities (the contract of the Triton `forward_stats_triton`).

    Returns stats (4, T) fp32 [lse, cp, cy, cu] with cp = 1 + 2 z lse, cy = 1 - eps, cu = eps / V (all 0 for ignored
    or out-of-range labels) and out (3, T) fp32 [loss (0 where not counted), valid (0/1), bad label (0/1)].
    """
    V = codes.shape[0]
    lse, total = lse_reference(P, codes, bias, softcap, label_smoothing > 0, chunk)
    valid = labels != ignore_index
    ok = valid & (labels >= 0) & (labels < V)
    target = torch.where(ok, labels, 0)
    idx = codes[target].long()  # (T, B): B gathers per token from P, fp32 sum (as the kernels do)
    target_logit = P.permute(2, 0, 1).gather(2, idx.unsqueeze(-1)).squeeze(-1).float().sum(dim=1)
    if bias is not None:
        target_logit = target_logit + bias[target].float()
    loss = lse - _softcap(target_logit, softcap)
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - total / V)
    loss = loss + z_loss * lse * lse
    okf = ok.float()
    stats = torch.stack([lse, okf * (1.0 + 2.0 * z_loss * lse), okf * (1.0 - label_smoothing),
                         okf * (label_smoothing / V)])
    out = torch.stack([torch.where(ok, loss, 0.0), okf, (valid & ~ok).float()])
    return stats, out


def ce_grad_reference(
    P: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None, stats: torch.Tensor, labels: torch.Tensor,
    scale: torch.Tensor, softcap: float | None = None, need_bias_grad: bool = True, chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch: grad_P (B, K, T) fp32 and grad_bias (V,) fp32 of the loss, given the forward's stats.

    g[t, w] = scale[t] (cp[t] softmax[t, w] - cy[t] [w = labels[t]] - cu[t])  (times 1 - tanh^2 when soft-capped);
    scale: (T,) or (1,) upstream gradient per token with the reduction folded in.
    """
    B, K, T = P.shape
    V = codes.shape[0]
    lse = stats[0]
    coefs = stats[1:] * scale.float()  # (3, T)
    target = torch.where((labels >= 0) & (labels < V), labels, 0)  # cy = 0 wherever the label is not a word
    grad_P = torch.empty(B, K, T, device=P.device, dtype=torch.float32)
    grad_bias = torch.zeros(V, device=P.device, dtype=torch.float32) if need_bias_grad else None
    step = _reference_chunk(T, V, chunk)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        cp, cy, cu = coefs[:, t0:t1, None]
        z = _chunk_logits(P, codes, bias, t0, t1)
        th = torch.tanh(z / softcap) if softcap is not None else None
        logits = softcap * th if softcap is not None else z
        g = cp * torch.exp(logits - lse[t0:t1, None]) - cu
        g.scatter_add_(1, target[t0:t1, None].long(), -cy)
        if softcap is not None:
            g *= 1.0 - th * th
        gP, gb = basis_decode_backward_reference(g, codes, K, need_bias_grad)
        grad_P[:, :, t0:t1] = gP
        if need_bias_grad:
            grad_bias += gb
    return grad_P, grad_bias


def _kernels(impl: str):
    if impl == "triton":
        from hf_basis.ops.basis_cross_entropy_triton import ce_grad_triton, forward_stats_triton

        return forward_stats_triton, ce_grad_triton
    return forward_stats_reference, ce_grad_reference


def _input_grads(needs, hidden, centroids, codes, bias, P, stats, labels, scale, softcap, impl, chunk):
    """Gradients of hidden, centroids and bias (None where not needed) for per-token upstream gradient `scale`."""
    need_hidden, need_centroids, need_bias = needs
    _, grad_fn = _kernels(impl)
    grad_P, grad_bias = grad_fn(P, codes, bias, stats, labels, scale, softcap, need_bias, chunk=chunk)  # (B, K, T)
    grad_hidden, grad_centroids = centroid_scores_backward(grad_P, hidden, centroids, need_hidden, need_centroids)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_centroids, grad_bias


def _one_pass(P, codes, need_bias, softcap, label_smoothing) -> bool:
    """Whether loss and gradients come from one gather pass (forward_stats_one_pass_triton) rather than two."""
    from hf_basis.ops.basis_cross_entropy_triton import ONE_PASS_MIN_LOGITS, one_pass_supported

    return (P.shape[2] * codes.shape[0] >= ONE_PASS_MIN_LOGITS and one_pass_supported(P, label_smoothing, softcap)
            and not need_bias and not (P.is_cuda and torch.cuda.is_current_stream_capturing()))  # its check syncs


def _cross_entropy_impl(
    hidden: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, softcap: float | None, impl: str,
    chunk: int | None, need_hidden: bool, need_centroids: bool, need_bias: bool, grads_in_forward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op `hf_basis::basis_cross_entropy`. hidden (T, H), centroids (B, K, d) in hidden's dtype, codes (V, B),
    bias (V,) or None, labels (T,) -> (loss, grad_hidden, grad_centroids, grad_bias, P, stats, count).

    With `grads_in_forward` (a scalar loss whose gradient will be needed; see `basis_cross_entropy`) the forward also
    computes the gradients the `need_*` flags ask for, for an upstream gradient of 1, and the backward only scales
    them: the backward then issues one op per gradient instead of ~10, which on a slow host is what paced a small
    call. Otherwise P (B, K, T), stats (4, T) and count (1,) (the "mean" denominator) are kept for the backward.
    Outputs not needed come back empty (an op returns tensors only). Kept lean on purpose: every PyTorch op is ~10 us
    of CPU, which matters next to ~1 ms of kernels.
    """
    forward_fn, _ = _kernels(impl)
    needs = (need_hidden, need_centroids, need_bias)
    P = centroid_scores(hidden, centroids).contiguous()  # (B, K, T)
    exp_sums = None
    if grads_in_forward and impl == "triton" and _one_pass(P, codes, need_bias, softcap, label_smoothing):
        from hf_basis.ops.basis_cross_entropy_triton import forward_stats_one_pass_triton

        stats, out, exp_sums = forward_stats_one_pass_triton(P, codes, bias, labels, ignore_index, label_smoothing,
                                                             z_loss, softcap, chunk)
    else:
        kwargs = {"chunk": chunk} if impl == "torch" else {}
        stats, out = forward_fn(P, codes, bias, labels, ignore_index, label_smoothing, z_loss, softcap, **kwargs)
    sums = out.sum(dim=1)  # loss sum, number of counted tokens, number of out-of-range labels
    torch._assert_async(sums[2] == 0, "basis_cross_entropy: a label is out of range [0, vocab)")
    # "mean" with no counted token: the coefficients are all 0, keep the scale finite
    count = sums[1].clamp_min(1.0).reshape(1) if reduction == "mean" else torch.ones(1, device=P.device)
    if reduction == "mean":
        loss = sums[0] / sums[1]
    elif reduction == "sum":
        loss = sums[0]
    else:
        loss = out[0]
    empty = P.new_empty(0)
    if not grads_in_forward:
        return loss, empty, empty.clone(), empty.clone(), P, stats, count
    if exp_sums is not None:
        from hf_basis.ops.basis_cross_entropy_triton import grad_from_sums_triton

        grad_P = grad_from_sums_triton(exp_sums, codes, labels, stats, 1.0 / count)
        grads = (*centroid_scores_backward(grad_P, hidden, centroids, *needs[:2]), None)
    else:
        grads = _input_grads(needs, hidden, centroids, codes, bias, P, stats, labels, 1.0 / count, softcap, impl,
                             chunk)
    grads = [g if g is not None else empty.clone() for g in grads]
    return loss, *grads, empty.clone(), empty.clone(), empty.clone()


def _cross_entropy_fake(hidden, centroids, codes, bias, labels, ignore_index, reduction, label_smoothing, z_loss,
                        softcap, impl, chunk, need_hidden, need_centroids, need_bias, grads_in_forward):
    T = hidden.shape[0]
    B, K, _ = centroids.shape
    loss = hidden.new_empty((T,) if reduction == "none" else (), dtype=torch.float32)

    def maybe(shape, wanted, dtype):
        return hidden.new_empty(shape, dtype=dtype) if wanted else hidden.new_empty(0)

    grads = (maybe(hidden.shape, grads_in_forward and need_hidden, hidden.dtype),
             maybe(centroids.shape, grads_in_forward and need_centroids, hidden.dtype),
             maybe(codes.shape[:1], grads_in_forward and need_bias, bias.dtype if bias is not None else hidden.dtype))
    P = maybe((B, K, T), not grads_in_forward, hidden.dtype)
    stats = maybe((4, T), not grads_in_forward, torch.float32)
    count = maybe((1,), not grads_in_forward, torch.float32)
    return loss, *grads, P, stats, count


def _cross_entropy_backward_impl(
    grad_out: torch.Tensor, hidden: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor,
    bias: torch.Tensor | None, P: torch.Tensor, stats: torch.Tensor, labels: torch.Tensor, count: torch.Tensor,
    reduction: str, softcap: float | None, impl: str, chunk: int | None, need_hidden: bool, need_centroids: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op `hf_basis::basis_cross_entropy_backward`: gradients of hidden, centroids and bias (empty where not
    needed) for upstream gradient `grad_out`."""
    scale = grad_out.float().contiguous() if reduction == "none" else grad_out.float().reshape(1)
    if reduction == "mean":
        scale = scale / count
    grads = _input_grads((need_hidden, need_centroids, need_bias), hidden, centroids, codes, bias, P, stats, labels,
                         scale, softcap, impl, chunk)
    empty = hidden.new_empty(0)
    return tuple(g if g is not None else empty.clone() for g in grads)


def _cross_entropy_backward_fake(grad_out, hidden, centroids, codes, bias, P, stats, labels, count, reduction,
                                 softcap, impl, chunk, need_hidden, need_centroids, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            hidden.new_empty(centroids.shape if need_centroids else (0,)),
            bias.new_empty(codes.shape[:1]) if need_bias else hidden.new_empty(0))


def _cross_entropy_setup_context(ctx, inputs, output):
    (hidden, centroids, codes, bias, labels, _, reduction, _, _, softcap, impl, chunk, need_hidden, need_centroids,
     need_bias, grads_in_forward) = inputs
    _, grad_hidden, grad_centroids, grad_bias, P, stats, count = output
    ctx.needs = (need_hidden, need_centroids, need_bias)
    ctx.grads_in_forward = grads_in_forward
    if grads_in_forward:
        ctx.save_for_backward(grad_hidden, grad_centroids, grad_bias)
    else:
        ctx.save_for_backward(hidden, centroids, codes, bias, P, stats, labels, count)
        ctx.options = (reduction, softcap, impl, chunk)


def _cross_entropy_backward(ctx, grad_out, *_unused):
    if ctx.grads_in_forward:
        present = [g for g, need in zip(ctx.saved_tensors, ctx.needs) if need]
        scaled = iter(torch._foreach_mul(present, grad_out))  # one launch; out of place (retain_graph reuses)
        grads = [next(scaled) if need else None for need in ctx.needs]
    elif not any(ctx.needs):
        grads = [None, None, None]
    else:
        hidden, centroids, codes, bias, P, stats, labels, count = ctx.saved_tensors
        grads = _cross_entropy_backward_op(grad_out, hidden, centroids, codes, bias, P, stats, labels, count,
                                           *ctx.options, *ctx.needs)
        grads = [g if need else None for g, need in zip(grads, ctx.needs)]
    grad_hidden, grad_centroids, grad_bias = grads
    return (grad_hidden, grad_centroids, None, grad_bias) + (None,) * 12


_cross_entropy_backward_op = hf_basis_op("basis_cross_entropy_backward", _cross_entropy_backward_impl,
                                         _cross_entropy_backward_fake)
_cross_entropy_op = hf_basis_op("basis_cross_entropy", _cross_entropy_impl, _cross_entropy_fake,
                                _cross_entropy_setup_context, _cross_entropy_backward)


def basis_cross_entropy(
    hidden: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    *,
    impl: str = "auto",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of a basis output layer's logits against `labels`, without building the logits.

    Args:
        hidden: (..., H) activations entering the output layer.
        centroids: (B, K, H / B) codebook centroids (cast to hidden's dtype, differentiably).
        codes: (V, B) integer codes, fixed.
        bias: (V,) or None.
        labels: (...) int64 targets in [0, V) or `ignore_index`; hidden's leading shape.
        ignore_index: label value that contributes nothing (and is not counted by "mean").
        reduction: "mean", "sum" or "none" (per token, labels' shape, 0 at ignored tokens).
        label_smoothing: eps in [0, 1], PyTorch's definition.
        z_loss: z >= 0: adds z * lse^2 per non-ignored token (reduced like the loss).
        softcap: if given, the logits are cap * tanh(logits / cap) (Gemma 2's final_logit_softcapping).
        impl: "auto" (Triton on CUDA, else PyTorch), "triton" (also on CPU under TRITON_INTERPRET=1), "torch".
        chunk_tokens: tokens per chunk (defaults: the Triton path sizes its V x Tc buffer to stay in L2; the
            PyTorch path builds at most 2**24 fp32 logits at a time).

    Returns the loss in fp32 (a scalar, or labels' shape for reduction="none"). Gradients reach hidden, centroids and
    bias; none of them ever needs a T x V tensor. For reduction "mean" / "sum" with grad enabled and an input that
    requires grad (bf16 / fp32 hidden), the gradients are computed during the forward and the backward only scales
    them, as in Liger-Kernel's fused linear cross-entropy: a loss computed under grad but never backpropagated costs
    those passes too (evaluate under `torch.no_grad()`, as the Trainer does).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if centroids.dim() != 3:
        raise ValueError(f"centroids must be (num_basis, num_clusters, sub_dim), got {tuple(centroids.shape)}")
    B, K, d = centroids.shape
    if codes.dim() != 2 or codes.shape[1] != B or codes.is_floating_point():
        raise ValueError(f"codes must be an integer (vocab, num_basis={B}) tensor, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    if hidden.shape[-1] != B * d:
        raise ValueError(f"hidden has {hidden.shape[-1]} features but the codebook expects {B * d}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's leading shape {tuple(hidden.shape[:-1])}")
    if bias is not None and bias.shape != (codes.shape[0],):
        raise ValueError(f"bias must be (vocab={codes.shape[0]},), got {tuple(bias.shape)}")
    if impl == "auto":
        impl = "triton" if use_triton(hidden, codes) else "torch"

    if centroids.dtype != hidden.dtype:
        centroids = centroids.to(hidden.dtype)
    # Gradients in the forward (as Liger's fused linear cross-entropy does) for a scalar loss under grad mode (the
    # Function adds: and some input needs a gradient). Not for fp16: there the backward's upstream gradient (often a
    # loss scale) must multiply before the rounding.
    grad_mode = torch.is_grad_enabled()
    needs = (grad_mode and hidden.requires_grad, grad_mode and centroids.requires_grad,
             grad_mode and bias is not None and bias.requires_grad)
    grads_in_forward = reduction != "none" and hidden.dtype != torch.float16 and any(needs)
    lead = labels.shape
    loss = _cross_entropy_op(
        hidden.reshape(-1, B * d), centroids, codes, bias, labels.reshape(-1), int(ignore_index), reduction,
        float(label_smoothing), float(z_loss), None if softcap is None else float(softcap), impl, chunk_tokens,
        *needs, grads_in_forward,
    )[0]
    return loss.view(lead) if reduction == "none" else loss
