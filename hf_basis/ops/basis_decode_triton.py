"""Triton kernels of the basis decode (imported lazily, only where `triton` exists).

    forward:   logits[t, w] = bias[w] + sum_b P[b, code[w, b], t]                 P: (B, K, T) -> logits: (T, V)
    backward:  grad_P[b, k, t] = sum_{w : code[w, b] = k} grad_logits[t, w]       grad_logits: (T, V) -> (B, K, T)
               grad_bias[w]    = sum_t grad_logits[t, w]

Forward, one launch: a program owns BLOCK_V words x BLOCK_T tokens; for each sub-space b it loads the words' codes and
gathers rows P[b, code, t_tile] (consecutive tokens, so every gather is coalesced), accumulates in fp32, adds the
bias and stores the tile transposed into logits (T, V). The grid runs the word tiles fastest, so the programs resident
at one time share a token tile of P and find it in L1/L2.

Backward, two launches and no atomics (deterministic by construction):
  1. `_transpose_rowsum_kernel`: grad_logits (T, V) -> Gt (V, T) in the gradient's own dtype (an exact copy), with
     grad_bias = row sums of Gt fused in.
  2. `_segment_sum_kernel`: one program per (b, k, token tile) sums the rows Gt[w] of the words whose b-th code is k.
     The words come from a CSR of the codes (per (b, k) the word ids sorted by code), built once with torch.sort and
     cached on the codes tensor's identity and `_version` (`codes_csr` in basis_decode.py, shared with the reference).
An atomic variant (read grad_logits once, B*V*T fp32 atomic adds onto grad_P) moves fewer bytes but measured 143 us
against 59 us for these two kernels (H100, T=128, V=100k, 8 x 384): L2 atomics on ~V/K-way collisions serialise. It
is not provided, so deterministic mode needs nothing special.

Block sizes come from `_forward_config` / `_transpose_config` / `_segment_config` (fixed heuristics by shape, measured
on an H100), kept apart from the kernels; the launchers take `config=` to override them. Works with triton >= 3.6.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hf_basis.ops.basis_decode import codes_csr
from hf_basis.ops.grid_math import cdiv, next_power_of_2

__all__ = ["basis_decode_triton", "basis_decode_backward_triton", "codes_csr"]


# --------------------------------------------------------------------------------------------------------------------
# Kernels. They call only builtins of triton.language (tl.full / tl.reduce, not the @jit-decorated tl.zeros /
# tl.sum), so that they also run under TRITON_INTERPRET=1 set after `triton` itself was imported (the tests): a
# @jit helper of triton.language is then compiled-mode and cannot be called from an interpreted kernel. tl.reduce
# with triton's own `_sum_combine` is what tl.sum does, and the interpreter maps it to numpy's sum.
# --------------------------------------------------------------------------------------------------------------------

_sum_combine = tl.standard._sum_combine


@triton.jit
def _decode_forward_kernel(
    P,  # (B, K, T) any strides; stride_pt == 1 gives coalesced gathers
    codes,  # (V, B) integer
    bias,  # (V,) or dummy
    out,  # (T, V) contiguous, P's dtype
    V,
    T,
    stride_pb,
    stride_pk,
    stride_pt,
    stride_cv,
    stride_cb,
    stride_bias,
    NUM_BASIS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_v = offs_v < V
    mask_t = offs_t < T
    mask = mask_v[:, None] & mask_t[None, :]

    acc = tl.full([BLOCK_V, BLOCK_T], 0.0, tl.float32)
    p_base = P
    c_ptrs = codes + offs_v * stride_cv
    for _b in tl.static_range(NUM_BASIS):
        code = tl.load(c_ptrs, mask=mask_v, other=0).to(tl.int32)
        rows = tl.load(p_base + code[:, None] * stride_pk + offs_t[None, :] * stride_pt, mask=mask, other=0.0)
        acc += rows.to(tl.float32)
        p_base += stride_pb  # pointer arithmetic: 64-bit, no int32 overflow across sub-spaces
        c_ptrs += stride_cb
    if HAS_BIAS:
        acc += tl.load(bias + offs_v * stride_bias, mask=mask_v, other=0.0).to(tl.float32)[:, None]

    # out[t, w]: the tile goes out transposed, contiguous along words. 64-bit base for T*V >= 2**31.
    out_base = out + (pid_t * BLOCK_T).to(tl.int64) * V
    local_t = tl.arange(0, BLOCK_T)
    tl.store(out_base + local_t[None, :] * V + offs_v[:, None], acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _transpose_rowsum_kernel(
    G,  # (T, V) grad_logits, any strides
    Gt,  # (V, T) contiguous, G's dtype
    gbias,  # (V,) or dummy
    V,
    T,
    stride_gt,
    stride_gv,
    HAS_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_v = tl.program_id(0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    local_t = tl.arange(0, BLOCK_T)
    local_v = tl.arange(0, BLOCK_V)
    gt_base = Gt + (pid_v * BLOCK_V).to(tl.int64) * T
    row_sum = tl.full([BLOCK_V], 0.0, tl.float32)
    g_base = G  # advanced by pointer arithmetic (64-bit): T * stride_gt may exceed int32
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + local_t
        mask = (offs_t < T)[:, None] & mask_v[None, :]
        g = tl.load(g_base + local_t[:, None] * stride_gt + offs_v[None, :] * stride_gv, mask=mask, other=0.0)
        tl.store(gt_base + local_v[None, :] * T + offs_t[:, None], g, mask=mask)  # (BLOCK_T, BLOCK_V) -> Gt rows
        if HAS_BIAS:
            row_sum += tl.reduce(g.to(tl.float32), 0, _sum_combine)
        g_base += BLOCK_T * stride_gt
    if HAS_BIAS:
        tl.store(gbias + offs_v, row_sum.to(gbias.dtype.element_ty), mask=mask_v)


@triton.jit
def _segment_sum_kernel(
    Gt,  # (V, T) contiguous
    words,  # (B*V,) int32: for each sub-space b, the word ids sorted by code
    seg_offsets,  # (B*K + 1,) int32: segment (b, k) is words[seg_offsets[b*K+k] : seg_offsets[b*K+k+1]]
    grad_P,  # (B, K, >= T), last dim contiguous, (b, k) rows stride_out apart
    T,
    stride_out,
    BLOCK_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    seg = tl.program_id(0)  # b * K + k, fastest: concurrent programs share a token tile of Gt
    pid_t = tl.program_id(1)
    start = tl.load(seg_offsets + seg)
    end = tl.load(seg_offsets + seg + 1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    local_w = tl.arange(0, BLOCK_W)
    acc = tl.full([BLOCK_W, BLOCK_T], 0.0, tl.float32)
    # the word ids of the next block are loaded one iteration ahead: the row gather never waits on them
    w_next = tl.load(words + start + local_w, mask=start + local_w < end, other=0)
    for i in range(start, end, BLOCK_W):
        w = w_next.to(tl.int64)
        mask_w = (i + local_w) < end
        nxt = i + BLOCK_W + local_w
        w_next = tl.load(words + nxt, mask=nxt < end, other=0)
        g = tl.load(Gt + w[:, None] * T + offs_t[None, :], mask=mask_w[:, None] & mask_t[None, :], other=0.0)
        acc += g.to(tl.float32)
    total = tl.reduce(acc, 0, _sum_combine)
    out_ptrs = grad_P + seg.to(tl.int64) * stride_out + offs_t
    tl.store(out_ptrs, total.to(grad_P.dtype.element_ty), mask=mask_t)


# --------------------------------------------------------------------------------------------------------------------
# Configs: fixed heuristics by shape (kept apart from the kernels). Override through the launchers' `config=`.
# --------------------------------------------------------------------------------------------------------------------


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, next_power_of_2(max(1, n)))


# Measured on an H100 (T=128, V=100k, 8 x 384, fp16; benchmarks/results/ and the notes in the report):
#   forward   32 words x 64 tokens, 2 warps: 25.0 us (64 x 64 x 4 warps 25.6-26.5, 64 words x 32 tokens 26.9, 128-token
#             tiles no faster, 256-wide tiles spill: 0.5 ms); at V=150k / 200k 33.7 / 44.3 us against 35.6 / 46.1;
#   transpose 64 words x 128 tokens, 2 warps: 24.0 us (2x the logits at copy bandwidth: 17 us);
#   segments  8 words x 128 tokens, 1 warp: 34.8 us (16 x 64 x 2 warps 37.9; 4 warps 47-49).
# Small programs win: the gathers are latency-bound and more resident programs keep more of them in flight.


@functools.lru_cache(maxsize=64)
def _forward_config(T: int, V: int, B: int) -> dict:
    """BLOCK_V words x BLOCK_T tokens per program: 2048 logits; fewer tokens (decoding) -> wider word tiles."""
    block_t = _pow2_at_most(T, 64)
    block_v = min(1024, 2048 // block_t)
    return {"BLOCK_V": block_v, "BLOCK_T": block_t, "num_warps": 2 if block_t == 64 else 4, "num_stages": 1}


@functools.lru_cache(maxsize=64)
def _transpose_config(T: int, V: int) -> dict:
    return {"BLOCK_V": 64, "BLOCK_T": _pow2_at_most(T, 128), "num_warps": 2, "num_stages": 1}


@functools.lru_cache(maxsize=64)
def _segment_config(T: int, V: int, B: int, K: int) -> dict:
    block_t = _pow2_at_most(T, 128)
    return {"BLOCK_W": max(8, min(128, 1024 // block_t)), "BLOCK_T": block_t, "num_warps": 1, "num_stages": 1}


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------


def basis_decode_triton(
    P: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None = None, config: dict | None = None
) -> torch.Tensor:
    """P (B, K, T), codes (V, B) integer, bias (V,) or None -> logits (T, V) contiguous in P's dtype (fp32 accum)."""
    B, K, T = P.shape
    V = codes.shape[0]
    out = torch.empty((T, V), device=P.device, dtype=P.dtype)
    if T == 0 or V == 0:
        return out
    if (K - 1) * abs(P.stride(1)) + (T - 1) * abs(P.stride(2)) >= 2**31:
        raise ValueError("one sub-space of P must span < 2**31 elements (32-bit offsets inside the kernel)")
    cfg = config or _forward_config(T, V, B)  # cached dict: read only
    grid = (cdiv(V, cfg["BLOCK_V"]), cdiv(T, cfg["BLOCK_T"]))
    args = (
        P,
        codes,
        bias if bias is not None else out,
        out,
        V,
        T,
        P.stride(0),
        P.stride(1),
        P.stride(2),
        codes.stride(0),
        codes.stride(1),
        bias.stride(0) if bias is not None else 1,
    )
    _decode_forward_kernel[grid](*args, NUM_BASIS=B, HAS_BIAS=bias is not None, **cfg)
    return out


def basis_decode_backward_triton(
    grad_logits: torch.Tensor,
    codes: torch.Tensor,
    num_clusters: int,
    need_bias_grad: bool = True,
    grad_dtype: torch.dtype = torch.float32,
    bias_grad_dtype: torch.dtype = torch.float32,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """grad_logits (T, V) -> grad_P (B, K, T), grad_bias (V,) or None. Deterministic (no atomics).

    Accumulates in fp32; `grad_dtype` / `bias_grad_dtype` choose the stored dtypes (fp32 by default; the autograd
    Function asks for P's and the bias' dtypes so that no cast launch follows).
    """
    T, V = grad_logits.shape
    B = codes.shape[1]
    dev = grad_logits.device
    grad_P = torch.empty((B, num_clusters, T), device=dev, dtype=grad_dtype)
    grad_bias = torch.empty((V,), device=dev, dtype=bias_grad_dtype) if need_bias_grad else None
    if T == 0 or V == 0:
        grad_P.zero_()
        if grad_bias is not None:
            grad_bias.zero_()
        return grad_P, grad_bias
    cfg = config or {}
    tcfg = cfg.get("transpose") or _transpose_config(T, V)  # cached dicts: read only
    scfg = cfg.get("segment") or _segment_config(T, V, B, num_clusters)

    words, seg_offsets = codes_csr(codes, num_clusters)
    Gt = torch.empty((V, T), device=dev, dtype=grad_logits.dtype)
    args = (
        grad_logits,
        Gt,
        grad_bias if grad_bias is not None else Gt,
        V,
        T,
        grad_logits.stride(0),
        grad_logits.stride(1),
    )
    _transpose_rowsum_kernel[(cdiv(V, tcfg["BLOCK_V"]),)](*args, HAS_BIAS=need_bias_grad, **tcfg)
    grid = (B * num_clusters, cdiv(T, scfg["BLOCK_T"]))
    _segment_sum_kernel[grid](Gt, words, seg_offsets, grad_P, T, T, **scfg)
    return grad_P, grad_bias
