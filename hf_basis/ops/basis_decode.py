"""Basis decode: the gather-sum that turns per-centroid scores into logits.

    logits[t, w] = bias[w] + sum_b P[b, code[w, b], t]

P is the centroid projection in the (B, K, T) layout (`torch.bmm(C, x.view(T, B, d).permute(1, 2, 0))`): one row of
P holds one centroid's score for every token, so gathering a row reads consecutive memory. Backward scatters the
logits' gradient back onto the centroids:

    grad_P[b, k, t] = sum over words w with code[w, b] = k of grad_logits[t, w]
    grad_bias[w]    = sum_t grad_logits[t, w]

Neither direction builds the dense V x H weight or a T x V x B intermediate.
This file holds the PyTorch reference (the CPU path and the tests' oracle) and the custom op (autograd, fake
implementation for tracing, dispatch to Triton or the reference).
"""

from __future__ import annotations

import weakref

import torch

from hf_basis.ops.custom_op import hf_basis_op
from hf_basis.ops.dispatch import use_triton

__all__ = [
    "basis_decode", "basis_decode_reference", "basis_decode_backward_reference", "check_codes_and_bias", "codes_csr",
    "decode_backward_op", "decode_impl",
]


def _check_shapes(P: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None) -> None:
    if P.dim() != 3:
        raise ValueError(f"P must be (num_basis, num_clusters, tokens), got shape {tuple(P.shape)}")
    check_codes_and_bias(codes, bias, P.shape[0])


def check_codes_and_bias(codes: torch.Tensor, bias: torch.Tensor | None, num_basis: int) -> None:
    """codes: an integer (vocab, num_basis) tensor; bias: None or (vocab,)."""
    if codes.dim() != 2 or codes.shape[1] != num_basis:
        raise ValueError(f"codes must be (vocab, num_basis={num_basis}), got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if bias is not None and bias.shape != (codes.shape[0],):
        raise ValueError(f"bias must be (vocab={codes.shape[0]},), got shape {tuple(bias.shape)}")


def basis_decode_reference(P: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch decode: P (B, K, T), codes (V, B), bias (V,) or None -> logits (T, V) in P's dtype.

    One `embedding_bag(mode="sum")` over the flattened table P.view(B*K, T): word w is the bag of rows
    b*K + code[w, b]. Accumulates in fp32 (fp64 for fp64 P).
    """
    _check_shapes(P, codes, bias)
    B, K, T = P.shape
    acc_dtype = torch.promote_types(P.dtype, torch.float32)
    offsets = torch.arange(B, device=codes.device, dtype=torch.long) * K
    rows = codes.long() + offsets  # (V, B) row ids into P.view(B*K, T)
    acc = torch.nn.functional.embedding_bag(rows, P.reshape(B * K, T).to(acc_dtype), mode="sum")  # (V, T)
    if bias is not None:
        acc += bias.to(acc_dtype)[:, None]
    return acc.t().to(P.dtype).contiguous()


def basis_decode_backward_reference(
    grad_logits: torch.Tensor, codes: torch.Tensor, num_clusters: int, need_bias_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch backward of the decode: grad_logits (T, V) -> grad_P (B, K, T), grad_bias (V,) or None, both fp32
    (fp64 for fp64 grad_logits).

    grad_P row (b, k) is the sum of the transposed gradient's rows (V, T) over the words whose b-th code is k: one
    `embedding_bag(mode="sum")` whose bags are the segments of the cached CSR of the codes (`codes_csr`). No
    T x V x B temporary, deterministic, and no `index_add_` (whose CPU kernel slowed down 60x on a busy 2-core machine).
    """
    V, B = codes.shape
    T = grad_logits.shape[0]
    grad_t = grad_logits.t().to(torch.promote_types(grad_logits.dtype, torch.float32)).contiguous()  # (V, T)
    words, seg_offsets = codes_csr(codes, num_clusters)
    grad_P = torch.nn.functional.embedding_bag(words, grad_t, seg_offsets, mode="sum", include_last_offset=True)
    grad_bias = grad_t.sum(dim=1) if need_bias_grad else None
    return grad_P.view(B, num_clusters, T), grad_bias


_CSR_CACHE: dict[int, tuple] = {}
_CSR_CACHE_MAX = 16


def _build_csr(codes: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    V, B = codes.shape
    key_offset = torch.arange(B, device=codes.device, dtype=torch.int64)[:, None] * num_clusters
    keys = (codes.t().to(torch.int64) + key_offset).reshape(-1)  # (B*V,), position b*V + w
    sorted_keys, order = torch.sort(keys, stable=True)  # deterministic
    words = (order % V).to(torch.int32)
    bounds = torch.arange(B * num_clusters + 1, device=codes.device, dtype=torch.int64)
    seg_offsets = torch.searchsorted(sorted_keys, bounds).to(torch.int32)
    return words, seg_offsets


def codes_csr(codes: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Words grouped by (b, k): words (B*V,) int32 and seg_offsets (B*K+1,) int32, segment (b, k) being
    words[seg_offsets[b*K + k] : seg_offsets[b*K + k + 1]] (word ids ascending within it).

    Built once per codes tensor (torch.sort + searchsorted) and cached on the identity of `codes` and its `_version`,
    so an in-place edit of the codes rebuilds it.
    """
    if codes.shape[0] * codes.shape[1] >= 2**31:
        raise ValueError("vocab * num_basis must be < 2**31 for the int32 CSR")
    entry = _CSR_CACHE.get(id(codes))
    if entry is not None:
        ref, version, k, csr = entry
        if ref() is codes and version == codes._version and k == num_clusters:
            return csr
    csr = _build_csr(codes, num_clusters)
    for key in [key for key, e in _CSR_CACHE.items() if e[0]() is None]:
        del _CSR_CACHE[key]
    if len(_CSR_CACHE) >= _CSR_CACHE_MAX:
        _CSR_CACHE.pop(next(iter(_CSR_CACHE)))
    _CSR_CACHE[id(codes)] = (weakref.ref(codes), codes._version, num_clusters, csr)
    return csr


def decode_impl(P: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The op `hf_basis::basis_decode`: Triton on CUDA, the PyTorch reference elsewhere."""
    if use_triton(P, codes):
        from hf_basis.ops.basis_decode_triton import basis_decode_triton

        return basis_decode_triton(P, codes, bias)
    return basis_decode_reference(P, codes, bias)


def _decode_fake(P, codes, bias):
    return P.new_empty(P.shape[2], codes.shape[0])


def _decode_backward_impl(
    grad_logits: torch.Tensor, codes: torch.Tensor, num_clusters: int, need_bias_grad: bool,
    grad_dtype: torch.dtype, bias_grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op `hf_basis::basis_decode_backward`: grad_P (B, K, T) in grad_dtype and grad_bias (V,) in bias_grad_dtype
    ((0,) when not needed: an op returns tensors only). The Triton path stores them directly in those dtypes (fp32
    accumulation either way)."""
    if use_triton(grad_logits, codes):
        from hf_basis.ops.basis_decode_triton import basis_decode_backward_triton

        grad_P, grad_bias = basis_decode_backward_triton(
            grad_logits, codes, num_clusters, need_bias_grad, grad_dtype=grad_dtype, bias_grad_dtype=bias_grad_dtype
        )
    else:
        grad_P, grad_bias = basis_decode_backward_reference(grad_logits, codes, num_clusters, need_bias_grad)
    if grad_P.dtype != grad_dtype:  # the reference's fp32 (Triton stores grad_dtype); a same-dtype `.to` dispatches
        grad_P = grad_P.to(grad_dtype)
    if grad_bias is None:
        return grad_P, grad_logits.new_empty(0, dtype=bias_grad_dtype)
    return grad_P, grad_bias if grad_bias.dtype == bias_grad_dtype else grad_bias.to(bias_grad_dtype)


def _decode_backward_fake(grad_logits, codes, num_clusters, need_bias_grad, grad_dtype, bias_grad_dtype):
    V, B = codes.shape
    grad_P = grad_logits.new_empty(B, num_clusters, grad_logits.shape[0], dtype=grad_dtype)
    return grad_P, grad_logits.new_empty(V if need_bias_grad else 0, dtype=bias_grad_dtype)


def _decode_setup_context(ctx, inputs, output):
    P, codes, bias = inputs
    ctx.save_for_backward(codes)
    ctx.num_clusters = P.shape[1]
    ctx.P_dtype = P.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _decode_backward(ctx, grad_logits: torch.Tensor):
    (codes,) = ctx.saved_tensors
    need_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    grad_P, grad_bias = decode_backward_op(
        grad_logits, codes, ctx.num_clusters, need_bias, ctx.P_dtype, ctx.bias_dtype or torch.float32
    )
    return grad_P if ctx.needs_input_grad[0] else None, None, grad_bias if need_bias else None


decode_backward_op = hf_basis_op("basis_decode_backward", _decode_backward_impl, _decode_backward_fake)
_decode_op = hf_basis_op("basis_decode", decode_impl, _decode_fake, _decode_setup_context, _decode_backward)


def basis_decode(P: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable decode. P: (B, K, T), codes: (V, B) integer, bias: (V,) or None -> logits (T, V) in P's dtype.

    Gradients flow to P and bias (codes are fixed). Runs the Triton kernels on CUDA, the PyTorch reference elsewhere;
    a custom op (`torch.ops.hf_basis.basis_decode`), so torch.compile / torch.export trace through it.
    """
    _check_shapes(P, codes, bias)
    return _decode_op(P, codes, bias)
