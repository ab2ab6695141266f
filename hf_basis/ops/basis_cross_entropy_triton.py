"""Triton kernels of the fused basis cross-entropy (imported lazily, only where `triton` exists).

Shapes: P (B, K, T) centroid scores (contiguous, tokens fastest), codes (V, B) contiguous, bias (V,) or None.
A logit is l[t, w] = bias[w] + sum_b P[b, code[w, b], t], optionally soft-capped: cap * tanh(l / cap).

    forward  `_lse_kernel`       grid (token blocks, vocabulary splits). A program walks the words of its split in
                                 BLOCK_V x BLOCK_T tiles, gathering B rows of P per tile (consecutive tokens, so each
                                 gather reads BLOCK_T * 2 contiguous bytes), and keeps an online log-sum-exp per
                                 (word slot, token) -- no cross-warp reduction inside the loop -- plus, for label
                                 smoothing, the plain sum of the logits. Writes (splits, T) partials.
             `_finalize_kernel`  per token: folds the partials into lse, gathers the target logit (B values of P),
                                 and writes the loss, the valid flag and the per-token coefficients of the gradient
                                 (stats (4, T): lse, cp, cy, cu; see below), so the custom op needs only a
                                 handful of PyTorch ops around the kernels (launches cost ~10-35 us of CPU each).
    backward `_ce_grad_kernel`   grid (word tiles,), one launch per token chunk [t0, t0 + n): a program owns BLOCK_V
                                 words, walks the chunk's tokens, recomputes the logits, and writes the gradient of the
                                 loss with respect to the logits straight into the transposed buffer Gt (V, Tc):
                                     g[t, w] = s[t] * (cp[t] softmax[t, w] - cy[t] [w = y[t]] - cu[t])  (x cap')
                                 (s: upstream gradient with the reduction folded in; cp = 1 + 2 z lse, cy = 1 - eps,
                                 cu = eps / V, all 0 for ignored tokens; cap' = 1 - tanh^2 when soft-capped). Row sums
                                 of g are added to grad_bias (fp32; the program owns its words: deterministic).
             segment sum         grad_P[b, k, t] = sum over words w with code[w, b] = k of Gt[w, t]: the decode
                                 backward's `_segment_sum_kernel` over its cached CSR of the codes (reused, not copied;
                                 deterministic, no atomics), launched right after each chunk's gradient so Gt is read
                                 back from L2.
    one pass `_ce_exp_kernel`    for a scalar loss whose gradients the forward computes (large calls, no bias
                                 gradient): per token chunk, Gt = exp(l' - shift[t]) with a per-token shift fixed
                                 beforehand, plus the per-split sums of exp(l' - shift) that give lse; the segment sum
                                 folds Gt as above, and `_grad_from_sums_kernel` turns those (B, K, T) sums into grad_P
                                 once lse is known. One gather pass over the logits instead of two (see
                                 `forward_stats_one_pass_triton`).

No T x V tensor is ever built: the largest temporary is Gt, V x Tc in P's dtype (Tc from `chunk_tokens`).
Measured on an H100 (benchmarks/benchmark_basis_ce.py --breakdown): the gathers are bound by the L1/LSU work per
gathered row, so token tiles of 32-128 bf16 tokens (64-256 contiguous bytes per row) win: ~330-420 logits/ns (16 or
8 tokens: 120-250 logits/ns); which one depends on whether P fits in L2 (`_lse_config`). The segment sum is bound by
L2 bandwidth (B * V * T * 2 bytes read, 4-6 TB/s).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hf_basis.ops.basis_decode_triton import _segment_sum_kernel, codes_csr
from hf_basis.ops.grid_math import cdiv, next_power_of_2

__all__ = [
    "lse_triton", "forward_stats_triton", "ce_grad_triton", "forward_stats_one_pass_triton", "grad_from_sums_triton",
    "ExpSums", "ONE_PASS_MIN_LOGITS", "one_pass_supported", "chunk_tokens", "SEGMENT_BLOCK_T",
]

_NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


@triton.jit
def _tanh(x):
    # tanh through one exp2: saturates cleanly to +-1 for large |x| (exp2 -> inf or 0).
    e = tl.exp2(x * 2.8853900817779268)  # 2 * log2(e)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _gather_logits(P, codes, bias, offs_v, offs_t, mask, mask_v, stride_pb, stride_pk, softcap,
                   NUM_BASIS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr):
    """(BLOCK_V, BLOCK_T) fp32 logits of words offs_v for tokens offs_t; also tanh(l / cap) when soft-capping."""
    acc = tl.zeros([BLOCK_V, BLOCK_T], dtype=tl.float32)
    p_base = P
    c_ptrs = codes + offs_v * NUM_BASIS
    for _b in tl.static_range(NUM_BASIS):
        code = tl.load(c_ptrs, mask=mask_v, other=0).to(tl.int32)
        acc += tl.load(p_base + code[:, None] * stride_pk + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        p_base += stride_pb  # 64-bit pointer arithmetic across sub-spaces
        c_ptrs += 1
    if HAS_BIAS:
        acc += tl.load(bias + offs_v, mask=mask_v, other=0.0).to(tl.float32)[:, None]
    th = acc
    if HAS_SOFTCAP:
        th = _tanh(acc / softcap)
        acc = softcap * th
    return acc, th


@triton.jit
def _lse_kernel(
    P,  # (B, K, T) contiguous
    codes,  # (V, B) contiguous integer
    bias,  # (V,) or dummy
    m_out,  # (S, T) fp32 running max per split
    s_out,  # (S, T) fp32 sum of exp(l - m) per split
    sum_out,  # (S, T) fp32 sum of logits per split (WITH_SUM) or dummy
    V,
    T,
    v_per_split,
    stride_pb,
    softcap,
    NUM_BASIS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_SUM: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    local_v = tl.arange(0, BLOCK_V)
    # Online log-sum-exp per (word slot, token), reduced once at the end: two exps per logit, but no cross-warp
    # reduction per tile (which cost more, measured). Finite start: no (-inf) - (-inf) NaNs.
    m2 = tl.full([BLOCK_V, BLOCK_T], -1.0e30, dtype=tl.float32)
    s2 = tl.zeros([BLOCK_V, BLOCK_T], dtype=tl.float32)
    total = tl.zeros([BLOCK_V, BLOCK_T], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + local_v
        mask_v = offs_v < v_end
        mask = mask_v[:, None] & mask_t[None, :]
        logits, _th = _gather_logits(P, codes, bias, offs_v, offs_t, mask, mask_v, stride_pb, T, softcap,
                                     NUM_BASIS, HAS_BIAS, HAS_SOFTCAP, BLOCK_V, BLOCK_T)
        if WITH_SUM:
            total += tl.where(mask_v[:, None], logits, 0.0)
        logits = tl.where(mask_v[:, None], logits, _NEG_INF)
        m2_new = tl.maximum(m2, logits)
        s2 = s2 * tl.exp(m2 - m2_new) + tl.exp(logits - m2_new)
        m2 = m2_new
    m = tl.max(m2, axis=0)
    s = tl.sum(s2 * tl.exp(m2 - m[None, :]), axis=0)
    out = split * T + offs_t
    tl.store(m_out + out, m, mask=mask_t)
    tl.store(s_out + out, s, mask=mask_t)
    if WITH_SUM:
        tl.store(sum_out + out, tl.sum(total, axis=0), mask=mask_t)


@triton.jit
def _finalize_kernel(
    P,  # (B, K, T) contiguous
    codes,  # (V, B) contiguous integer
    bias,  # (V,) or dummy
    labels,  # (T,) integer
    m_part,  # (S, T) fp32
    s_part,  # (S, T) fp32
    sum_part,  # (S, T) fp32 or dummy
    stats,  # (4, T) fp32 out: lse, cp, cy, cu
    out,  # (3, T) fp32 out: loss (0 where ignored), valid (0/1), bad label (0/1)
    ycoef,  # (T,) fp32 out (STORE_YCOEF): the label word's dloss/dl' without the upstream gradient, or dummy
    V,
    T,
    K,
    n_splits,
    ignore_index,
    eps,
    z_loss,
    softcap,
    NUM_BASIS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_SUM: tl.constexpr,
    STORE_YCOEF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < T
    m = tl.full([BLOCK], _NEG_INF, dtype=tl.float32)
    for i in range(n_splits):
        m = tl.maximum(m, tl.load(m_part + i * T + offs, mask=mask, other=0.0))
    s = tl.zeros([BLOCK], dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n_splits):
        s += tl.load(s_part + i * T + offs, mask=mask, other=0.0) * tl.exp(
            tl.load(m_part + i * T + offs, mask=mask, other=0.0) - m)
        if WITH_SUM:
            total += tl.load(sum_part + i * T + offs, mask=mask, other=0.0)
    lse = tl.where(mask, m + tl.log(tl.where(mask, s, 1.0)), 0.0)

    y = tl.load(labels + offs, mask=mask, other=ignore_index).to(tl.int64)
    valid = mask & (y != ignore_index)
    bad = valid & ((y < 0) | (y >= V))
    ok = valid & (y >= 0) & (y < V)
    yy = tl.where(ok, y, 0)
    target = tl.zeros([BLOCK], dtype=tl.float32)
    p_base = P
    for b in tl.static_range(NUM_BASIS):
        code = tl.load(codes + yy * NUM_BASIS + b, mask=mask, other=0).to(tl.int64)
        target += tl.load(p_base + code * T + offs, mask=mask, other=0.0).to(tl.float32)
        p_base += K * T
    if HAS_BIAS:
        target += tl.load(bias + yy, mask=mask, other=0.0).to(tl.float32)
    th_y = target
    if HAS_SOFTCAP:
        th_y = _tanh(target / softcap)
        target = softcap * th_y
    loss = lse - target
    if WITH_SUM:
        loss = (1.0 - eps) * loss + eps * (lse - total / V)
    loss += z_loss * lse * lse
    okf = ok.to(tl.float32)
    tl.store(stats + offs, lse, mask=mask)
    tl.store(stats + T + offs, okf * (1.0 + 2.0 * z_loss * lse), mask=mask)
    tl.store(stats + 2 * T + offs, okf * (1.0 - eps), mask=mask)
    tl.store(stats + 3 * T + offs, okf * (eps / V), mask=mask)
    tl.store(out + offs, tl.where(ok, loss, 0.0), mask=mask)
    tl.store(out + T + offs, okf, mask=mask)
    tl.store(out + 2 * T + offs, bad.to(tl.float32), mask=mask)
    if STORE_YCOEF:
        coef = okf * ((1.0 + 2.0 * z_loss * lse) * tl.exp(target - lse) - (1.0 - eps))
        if HAS_SOFTCAP:
            coef *= 1.0 - th_y * th_y
        tl.store(ycoef + offs, coef, mask=mask)


@triton.jit
def _ce_grad_kernel(
    P,  # (B, K, T) contiguous
    codes,  # (V, B) contiguous integer
    bias,  # (V,) or dummy
    stats,  # (4, T) fp32: lse, cp, cy, cu
    labels,  # (T,) integer (ignored / out-of-range tokens have cp = cy = cu = 0)
    scale,  # upstream gradient per token (with the reduction folded in): scale[t * scale_stride]
    Gt,  # (V, Tc) output, row stride stride_g, P's dtype
    gbias,  # (V,) fp32 accumulated in place, or dummy
    V,
    T,
    t_start,
    n_tok,
    stride_g,
    stride_pb,
    scale_stride,
    softcap,
    NUM_BASIS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_BIAS_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_v = tl.program_id(0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    local_t = tl.arange(0, BLOCK_T)
    rows = Gt + offs_v.to(tl.int64)[:, None] * stride_g
    bias_acc = tl.zeros([BLOCK_V, BLOCK_T], dtype=tl.float32)
    for t0 in range(0, n_tok, BLOCK_T):
        offs_l = t0 + local_t  # position inside the chunk
        mask_t = offs_l < n_tok
        offs_t = t_start + offs_l  # token index
        mask = mask_v[:, None] & mask_t[None, :]
        logits, th = _gather_logits(P, codes, bias, offs_v, offs_t, mask, mask_v, stride_pb, T, softcap,
                                    NUM_BASIS, HAS_BIAS, HAS_SOFTCAP, BLOCK_V, BLOCK_T)
        # Per-token values loaded after the gathers: fewer registers live across them (measured 40% faster).
        sc = tl.load(scale + offs_t * scale_stride, mask=mask_t, other=0.0)
        row_lse = tl.load(stats + offs_t, mask=mask_t, other=0.0)
        cp = sc * tl.load(stats + T + offs_t, mask=mask_t, other=0.0)
        cy = sc * tl.load(stats + 2 * T + offs_t, mask=mask_t, other=0.0)
        cu = sc * tl.load(stats + 3 * T + offs_t, mask=mask_t, other=0.0)
        y = tl.load(labels + offs_t, mask=mask_t, other=-1)
        g = cp[None, :] * tl.exp(logits - row_lse[None, :]) - cu[None, :]
        g -= tl.where(offs_v[:, None] == y[None, :], cy[None, :], 0.0)
        if HAS_SOFTCAP:
            g *= 1.0 - th * th
        g = tl.where(mask, g, 0.0)
        tl.store(rows + offs_l[None, :], g.to(Gt.dtype.element_ty), mask=mask)
        if NEED_BIAS_GRAD:
            bias_acc += g
    if NEED_BIAS_GRAD:
        gb = tl.load(gbias + offs_v, mask=mask_v, other=0.0) + tl.sum(bias_acc, axis=1)
        tl.store(gbias + offs_v, gb, mask=mask_v)


@triton.jit
def _ce_exp_kernel(
    P,  # (B, K, T) contiguous
    codes,  # (V, B) contiguous integer
    bias,  # (V,) or dummy
    shift,  # (T,) fp32 per-token shift m
    labels,  # (T,) integer
    Gt,  # (V, Tc) output, row stride stride_g, P's dtype
    s_part,  # (S, Tc) fp32 out, row stride stride_g: per split, sum over its words of exp(l' - m)
    sum_part,  # (S, Tc) fp32 out: per split, sum over its words of l' (WITH_SUM), or dummy
    V,
    T,
    t_start,
    n_tok,
    v_per_split,
    stride_g,
    stride_pb,
    softcap,
    NUM_BASIS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_SUM: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # Walks the words of its split like _lse_kernel, for a token block of the chunk [t_start, t_start + n_tok): the
    # sums stay per (word slot, token) in registers and are reduced once at the end.
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    offs_l = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # position inside the chunk
    mask_t = offs_l < n_tok
    offs_t = t_start + offs_l  # token index
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    local_v = tl.arange(0, BLOCK_V)
    m = tl.load(shift + offs_t, mask=mask_t, other=0.0)
    y = tl.load(labels + offs_t, mask=mask_t, other=-1)
    s2 = tl.zeros([BLOCK_V, BLOCK_T], dtype=tl.float32)
    total = tl.zeros([BLOCK_V, BLOCK_T], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + local_v
        mask_v = offs_v < v_end
        mask = mask_v[:, None] & mask_t[None, :]
        logits, th = _gather_logits(P, codes, bias, offs_v, offs_t, mask, mask_v, stride_pb, T, softcap,
                                    NUM_BASIS, HAS_BIAS, HAS_SOFTCAP, BLOCK_V, BLOCK_T)
        e = tl.where(mask, tl.exp(logits - m[None, :]), 0.0)
        s2 += e
        if WITH_SUM:
            total += tl.where(mask, logits, 0.0)
        e = tl.where(offs_v[:, None] == y[None, :], 0.0, e)  # the label word's gradient is added exactly later
        if HAS_SOFTCAP:
            e *= 1.0 - th * th
        tl.store(Gt + offs_v.to(tl.int64)[:, None] * stride_g + offs_l[None, :], e.to(Gt.dtype.element_ty), mask=mask)
    tl.store(s_part + split * stride_g + offs_l, tl.sum(s2, axis=0), mask=mask_t)
    if WITH_SUM:
        tl.store(sum_part + split * stride_g + offs_l, tl.sum(total, axis=0), mask=mask_t)


@triton.jit
def _grad_from_sums_kernel(
    G,  # (B, K, >= T) in: segment sums of the exp kernel's output; out: grad_P. (b, k) rows stride_g apart
    codes,  # (V, B) contiguous integer
    labels,  # (T,) integer
    stats,  # (4, T) fp32: lse, cp, cy, cu
    shift,  # (T,) fp32
    ycoef,  # (T,) fp32: the label word's dloss/dl' without the upstream gradient (0 where not counted)
    scale,  # upstream gradient per token: scale[t * scale_stride]
    seg_offsets,  # (B*K + 1,) int32: segment (b, k) holds seg_offsets[b*K+k+1] - seg_offsets[b*K+k] words
    V,
    T,
    K,
    stride_g,
    scale_stride,
    NUM_BASIS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    sc = tl.load(scale + offs_t * scale_stride, mask=mask_t, other=0.0)
    lse = tl.load(stats + offs_t, mask=mask_t, other=0.0)
    cp = tl.load(stats + T + offs_t, mask=mask_t, other=0.0)
    cu = tl.load(stats + 3 * T + offs_t, mask=mask_t, other=0.0)
    alpha = sc * cp * tl.exp(tl.load(shift + offs_t, mask=mask_t, other=0.0) - lse)  # softmax = alpha * exp(l' - m)
    lam = sc * tl.load(ycoef + offs_t, mask=mask_t, other=0.0)
    y = tl.load(labels + offs_t, mask=mask_t, other=0)
    y = tl.where((y >= 0) & (y < V), y, 0).to(tl.int64)  # lam = 0 wherever the label is not a word
    code_y = tl.load(codes + y * NUM_BASIS + b, mask=mask_t, other=0).to(tl.int32)
    seg = b * K + offs_k
    count = (tl.load(seg_offsets + seg + 1, mask=mask_k, other=0) - tl.load(seg_offsets + seg, mask=mask_k, other=0))
    ptrs = G + seg.to(tl.int64)[:, None] * stride_g + offs_t[None, :]
    mask = mask_k[:, None] & mask_t[None, :]
    g = alpha[None, :] * tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    g -= (sc * cu)[None, :] * count.to(tl.float32)[:, None]
    g += tl.where(offs_k[:, None] == code_y[None, :], lam[None, :], 0.0)
    tl.store(ptrs, g.to(G.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------------
# Configs: fixed heuristics by shape, kept apart from the kernels. Override through the launchers' `config=`.
# --------------------------------------------------------------------------------------------------------------------

SEGMENT_BLOCK_T = 64  # token tile of the segment sum; chunks are multiples of it
# Gt (V x Tc) budget. Fewer, larger chunks win although Gt then spills out of L2 (H100, bf16, 8 x 384, fwd+bwd GPU time
# by CUDA-graph replay / wall time of back-to-back calls, 64 -> 256 MiB): T,H,V = 2048,2048,50000: 1.06 -> 0.94 ms /
# 1.64 -> 1.24 ms (two Triton launches instead of eight: each costs 60-85 us of CPU on that host); 8192,4096,128256:
# 8.66 -> 8.27 ms; 16384,768,128256: 17.1 -> 16.3 ms. 512 MiB is no faster.
_GT_BYTES = 256 * 2**20


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: fewer programs


def chunk_tokens(T: int, V: int, element_size: int, budget_bytes: int = _GT_BYTES) -> int:
    """Tokens per backward chunk: Gt (V, Tc) within `budget_bytes`, a multiple of SEGMENT_BLOCK_T, <= T rounded up."""
    tc = max(SEGMENT_BLOCK_T, (budget_bytes // max(1, V * element_size)) // SEGMENT_BLOCK_T * SEGMENT_BLOCK_T)
    return min(tc, cdiv(max(T, 1), SEGMENT_BLOCK_T) * SEGMENT_BLOCK_T)


def _splits(n_blocks: int, V: int, block_v: int, programs_per_sm: int, device: torch.device) -> int:
    """Vocabulary splits so that n_blocks x splits ~ programs_per_sm programs per SM, each walking >= 4 word tiles."""
    return max(1, min(cdiv(programs_per_sm * _num_sms(device), n_blocks), cdiv(V, 4 * block_v)))


def _word_splits(V: int, splits: int, block_v: int) -> tuple[int, int]:
    """(words per split, a whole number of word tiles; number of non-empty splits) for about `splits` splits."""
    v_per_split = cdiv(cdiv(V, splits), block_v) * block_v
    return v_per_split, cdiv(V, v_per_split)


_P_IN_L2_BYTES = 32 * 2**20  # P (B x K x T) up to this size stays resident in the H100's 50 MB L2 next to the rest


def _lse_config(T: int, V: int, p_bytes: int, device: torch.device) -> dict:
    """Block sizes of `_lse_kernel` by where P lives (H100, --breakdown, bf16, 8 x 384):
    P beyond L2 (T=8192: 50 MB): 32 tokens x 256 words, 8 warps, 2 programs/SM: 3.01 ms (64 x 128: 3.24; 64 x 32 x
        2 warps: 4.50). A 32-token tile of P (B*K*32*2 = 192 KB) stays in one SM's L1 while 256 words gather from it.
    P in L2 (T=2048: 12.6 MB): 64 tokens x 32 words, 2 warps, 8 programs/SM: 0.268 ms (64 x 128: 0.312; 32 x 256:
        0.351). Every gather hits L2, so many small programs keep the most gathers in flight.
    """
    if p_bytes > _P_IN_L2_BYTES:
        block_t, block_v, warps, per_sm = 32, 256, 8, 2
    else:
        block_t, block_v, warps, per_sm = 64, 32, 2, 8
    splits = _splits(cdiv(T, block_t), V, block_v, per_sm, device)
    return {"BLOCK_T": block_t, "BLOCK_V": block_v, "splits": splits, "num_warps": warps, "num_stages": 1}


def _exp_config(Tc: int, V: int, device: torch.device) -> dict:
    """Block sizes of `_ce_exp_kernel` (H100, bf16, 8 x 384, fwd+bwd of the one-pass loss; T, H, V = 16384, 768,
    128256 / 8192, 4096, 128256): 64 tokens x 64 words, 4 warps, 4 programs/SM: 12.9 / 7.8 ms (64 x 32 x 2 warps x 8:
    13.9 / 8.0; 128 x 32: 13.8 / 8.5; 32 x 256 x 8 warps: 16.9 / 10.4)."""
    block_t, block_v, per_sm = 64, 64, 4
    splits = _splits(cdiv(Tc, block_t), V, block_v, per_sm, device)
    return {"BLOCK_T": block_t, "BLOCK_V": block_v, "splits": splits, "num_warps": 4, "num_stages": 1}


def _grad_config(Tc: int, V: int) -> dict:
    # H100: 128 tokens x 32 words, 4 warps: 2.56 ms / 0.27 ms for the two shapes above (32 x 128: 4.0 / 0.48).
    return {"BLOCK_T": 128, "BLOCK_V": 32, "num_warps": 4, "num_stages": 1}


def _segment_config(Tc: int) -> dict:
    return {"BLOCK_W": 32, "BLOCK_T": min(SEGMENT_BLOCK_T, next_power_of_2(Tc)), "num_warps": 4, "num_stages": 2}


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------


def _check(P: torch.Tensor, codes: torch.Tensor) -> None:
    if not P.is_contiguous():
        raise ValueError("P must be contiguous (B, K, T)")
    if P.shape[0] != codes.shape[1]:
        raise ValueError(f"P has {P.shape[0]} sub-spaces, codes {codes.shape[1]}")


def lse_partials_triton(P, codes, bias, softcap=None, with_sum=False, config=None):
    """Per-split partials of the online log-sum-exp: m, s (and the logit sum) as (S, T) fp32."""
    _check(P, codes)
    codes = codes.contiguous()
    B, K, T = P.shape
    V = codes.shape[0]
    cfg = dict(config or _lse_config(T, V, P.numel() * P.element_size(), P.device))
    v_per_split, splits = _word_splits(V, cfg.pop("splits"), cfg["BLOCK_V"])
    m = torch.empty((splits, T), device=P.device, dtype=torch.float32)
    s = torch.empty_like(m)
    total = torch.empty_like(m) if with_sum else m
    if T > 0:
        _lse_kernel[(cdiv(T, cfg["BLOCK_T"]), splits)](
            P, codes, bias if bias is not None else P, m, s, total, V, T, v_per_split, P.stride(0),
            float(softcap or 1.0), NUM_BASIS=B, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            WITH_SUM=with_sum, **cfg,
        )
    return m, s, (total if with_sum else None)


def lse_triton(P, codes, bias, softcap=None, with_sum=False, config=None):
    """lse (T,) fp32 of the (soft-capped) logits and, if `with_sum`, their sum over the vocabulary (T,)."""
    m, s, total = lse_partials_triton(P, codes, bias, softcap, with_sum, config)
    m_max = m.max(dim=0).values
    lse = m_max + torch.log((s * torch.exp(m - m_max)).sum(dim=0))
    return lse, (total.sum(dim=0) if with_sum else None)


def forward_stats_triton(P, codes, bias, labels, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                         config=None):
    """The forward's per-token quantities: stats (4, T) [lse, cp, cy, cu] and out (3, T) [loss, valid, bad label].

    Two launches (`_lse_kernel`, `_finalize_kernel`); see the module docstring for the definitions.
    """
    codes = codes.contiguous()
    with_sum = label_smoothing > 0
    m, s, total = lse_partials_triton(P, codes, bias, softcap, with_sum, config)
    return _finalize(P, codes, bias, labels, ignore_index, label_smoothing, z_loss, softcap, m, s, total)


def _finalize(P, codes, bias, labels, ignore_index, label_smoothing, z_loss, softcap, m, s, total, ycoef=None):
    """`_finalize_kernel` over log-sum-exp partials m, s, total (S, T) -> stats (4, T), out (3, T); fills ycoef."""
    B, K, T = P.shape
    V = codes.shape[0]
    with_sum = total is not None
    stats = torch.empty((4, T), device=P.device, dtype=torch.float32)
    out = torch.empty((3, T), device=P.device, dtype=torch.float32)
    if T > 0:
        block = 256
        _finalize_kernel[(cdiv(T, block),)](
            P, codes, bias if bias is not None else P, labels, m, s, total if with_sum else m, stats, out,
            ycoef if ycoef is not None else stats, V, T, K, m.shape[0], int(ignore_index), float(label_smoothing),
            float(z_loss), float(softcap or 1.0), NUM_BASIS=B, HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None, WITH_SUM=with_sum, STORE_YCOEF=ycoef is not None, BLOCK=block,
            num_warps=4,
        )
    return stats, out


def _chunk_buffers(P: torch.Tensor, V: int, chunk: int | None):
    """Token chunking of the gradient passes: Tc, the number of chunks, grad_P padded to whole chunks (each chunk's
    segment sums land in its columns; the padding is sliced off, no copy) and the (V, Tc) buffer Gt (None if T = 0)."""
    B, K, T = P.shape
    Tc = chunk or chunk_tokens(T, V, P.element_size())
    Tc = cdiv(Tc, SEGMENT_BLOCK_T) * SEGMENT_BLOCK_T if Tc >= SEGMENT_BLOCK_T else Tc
    n_chunks = cdiv(T, Tc) if T > 0 else 0
    gP = torch.empty((B, K, n_chunks * Tc), device=P.device, dtype=P.dtype)
    Gt = torch.empty((V, Tc), device=P.device, dtype=P.dtype) if n_chunks else None
    if n_chunks == 1 and T < Tc:
        Gt[:, T:].zero_()  # padding columns are dropped, but keep uninitialised NaNs out of the segment sums
    return Tc, n_chunks, gP, Gt


def ce_grad_triton(
    P: torch.Tensor,
    codes: torch.Tensor,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    softcap: float | None = None,
    need_bias_grad: bool = True,
    chunk: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradient of the loss with respect to P and the bias, chunk by chunk of tokens.

    stats: (4, T) fp32 [lse, cp, cy, cu]; labels: (T,); scale: (T,) or (1,) fp32 upstream gradient per token.
    Per chunk: `_ce_grad_kernel` writes Gt (V, Tc), then the decode backward's segment sum folds it into grad_P.
    Returns grad_P (B, K, T) in P's dtype (fp32 accumulation; a view of a buffer padded to whole chunks, last dim
    contiguous) and grad_bias (V,) fp32 or None.
    """
    _check(P, codes)
    codes = codes.contiguous()
    B, K, T = P.shape
    V = codes.shape[0]
    dev = P.device
    Tc, n_chunks, gP, Gt = _chunk_buffers(P, V, chunk)
    gcfg = dict((config or {}).get("grad") or _grad_config(Tc, V))
    scfg = dict((config or {}).get("segment") or _segment_config(Tc))
    gbias = torch.zeros(V, device=dev, dtype=torch.float32) if need_bias_grad else None
    if n_chunks:
        words, seg_offsets = codes_csr(codes, K)
        grid_g = (cdiv(V, gcfg["BLOCK_V"]),)
        grid_s = (B * K, cdiv(Tc, scfg["BLOCK_T"]))
        scale_stride = 1 if scale.numel() > 1 else 0
        for i in range(n_chunks):
            t0 = i * Tc
            _ce_grad_kernel[grid_g](
                P, codes, bias if bias is not None else P, stats, labels, scale, Gt,
                gbias if gbias is not None else stats, V, T, t0, min(Tc, T - t0), Tc, P.stride(0), scale_stride,
                float(softcap or 1.0), NUM_BASIS=B, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                NEED_BIAS_GRAD=need_bias_grad, **gcfg,
            )
            _segment_sum_kernel[grid_s](Gt, words, seg_offsets, gP[:, :, t0:], Tc, gP.stride(1), **scfg)
    grad_P = gP[:, :, :T]
    return grad_P, gbias


# The one-pass path pays one host sync (its overflow check) and a few more launches for one fewer gather pass: a gain
# from about this many logits per call (H100: T, V = 8192, 128256 -> 0.91x the two-pass time, 16384, 128256 -> 0.78x;
# at 2048, 50000 the sync exposes the host's launch time: 1.9 vs 1.1 ms).
ONE_PASS_MIN_LOGITS = 2**28
# The one-pass path's per-token shift: the largest logit among the first _SHIFT_SAMPLE_WORDS words plus
# _SHIFT_MARGIN. With s <= max logit, shift - max <= 20: every word within 60 nats of the max keeps a normal
# exp(l - shift) >= e^-80 (fp32 and bf16 share the exponent range) and the rest are < e^-60 of the softmax. Only a
# max more than ~97 nats above the sample overflows the fp32 sum (exp(88.7) / V); that is detected and recomputed.
_SHIFT_SAMPLE_WORDS = 2048
_SHIFT_MARGIN = 20.0


def one_pass_supported(P: torch.Tensor, label_smoothing: float, softcap: float | None) -> bool:
    """Whether `forward_stats_one_pass_triton` handles these scores and options: fp32 / bf16 only (exp(l - shift)
    needs their exponent range) and not label smoothing with soft-capping (its eps / V term would need the per-word
    tanh factor inside the sums)."""
    return P.dtype in (torch.float32, torch.bfloat16) and not (softcap is not None and label_smoothing > 0)


class ExpSums(NamedTuple):
    """What the one-pass forward leaves for `grad_from_sums_triton`."""

    sums: torch.Tensor  # (B, K, T) view of a padded buffer: per segment, sum of exp(l' - shift) without label words
    shift: torch.Tensor  # (T,) fp32
    ycoef: torch.Tensor  # (T,) fp32 label word's dloss/dl' for an upstream gradient of 1


def forward_stats_one_pass_triton(
    P: torch.Tensor,
    codes: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, ExpSums | None]:
    """`forward_stats_triton`'s stats and out plus, from the same gathers, the segment sums the gradient needs.

    One gather pass over the logits instead of two (log-sum-exp, then gradient): per token chunk `_ce_exp_kernel`
    writes Gt[w, t] = exp(l' - shift[t]) (times 1 - tanh^2 when soft-capped; 0 at the label word) with per-program
    sums of exp(l' - shift) for the log-sum-exp, and the segment sum folds Gt into per-(b, k) sums. The softmax is
    exp(lse - shift) times those, so `grad_from_sums_triton` finishes grad_P on the (B, K, T) sums once lse is known:
        grad_P[b, k, t] = s cp exp(shift - lse) sums[b, k, t] - s cu |{w: code[w, b] = k}| + [k = code[y, b]] s ycoef
    Not for label smoothing with soft-capping (the eps / V term then needs the per-word tanh factor) nor for a bias
    gradient (a per-word sum over tokens of the softmax): the caller uses the two-pass path there.
    If a shift overflowed (logits ~100 nats above every sampled word), this syncs once to find out, recomputes stats
    by the two-pass forward and returns None for the sums.
    """
    _check(P, codes)
    if not one_pass_supported(P, label_smoothing, softcap):
        raise ValueError(f"the one-pass forward needs fp32 / bf16 scores (got {P.dtype}) and not label smoothing "
                         f"together with soft-capping (got {label_smoothing}, {softcap})")
    codes = codes.contiguous()
    B, K, T = P.shape
    V = codes.shape[0]
    dev = P.device
    with_sum = label_smoothing > 0
    n = min(V, _SHIFT_SAMPLE_WORDS)
    m_sample, _, _ = lse_partials_triton(P, codes[:n], None if bias is None else bias[:n], softcap)
    shift = m_sample.amax(dim=0) + _SHIFT_MARGIN
    s = torch.empty(T, device=dev, dtype=torch.float32)
    total = torch.empty(T, device=dev, dtype=torch.float32) if with_sum else None
    Tc, n_chunks, gP, Gt = _chunk_buffers(P, V, chunk)
    ecfg = dict((config or {}).get("exp") or _exp_config(Tc, V, dev))
    v_per_split, splits = _word_splits(V, ecfg.pop("splits"), ecfg["BLOCK_V"])
    scfg = dict((config or {}).get("segment") or _segment_config(Tc))
    if n_chunks:
        words, seg_offsets = codes_csr(codes, K)
        s_part = torch.empty((splits, Tc), device=dev, dtype=torch.float32)
        sum_part = torch.empty_like(s_part) if with_sum else s_part
        grid_s = (B * K, cdiv(Tc, scfg["BLOCK_T"]))
        for i in range(n_chunks):
            t0 = i * Tc
            nt = min(Tc, T - t0)
            _ce_exp_kernel[(cdiv(nt, ecfg["BLOCK_T"]), splits)](
                P, codes, bias if bias is not None else P, shift, labels, Gt, s_part, sum_part, V, T, t0, nt,
                v_per_split, Tc, P.stride(0), float(softcap or 1.0), NUM_BASIS=B, HAS_BIAS=bias is not None,
                HAS_SOFTCAP=softcap is not None, WITH_SUM=with_sum, **ecfg,
            )
            _segment_sum_kernel[grid_s](Gt, words, seg_offsets, gP[:, :, t0:], Tc, gP.stride(1), **scfg)
            torch.sum(s_part[:, :nt], dim=0, out=s[t0:t0 + nt])
            if with_sum:
                torch.sum(sum_part[:, :nt], dim=0, out=total[t0:t0 + nt])
    ycoef = torch.empty(T, device=dev, dtype=torch.float32)
    stats, out = _finalize(P, codes, bias, labels, ignore_index, label_smoothing, z_loss, softcap, shift[None],
                           s[None], None if total is None else total[None], ycoef)
    if not bool(torch.isfinite(stats[0]).all()):  # the one sync: a shift overflowed somewhere
        return (*forward_stats_triton(P, codes, bias, labels, ignore_index, label_smoothing, z_loss, softcap), None)
    return stats, out, ExpSums(gP[:, :, :T], shift, ycoef)


def grad_from_sums_triton(
    exp_sums: ExpSums, codes: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """grad_P (B, K, T) in P's dtype from the one-pass forward's sums, in place of them (see its docstring).

    scale: (T,) or (1,) fp32 upstream gradient per token with the reduction folded in.
    """
    G = exp_sums.sums
    B, K, T = G.shape
    codes = codes.contiguous()
    if T > 0:
        _, seg_offsets = codes_csr(codes, K)
        block_k, block_t = 64, 64
        _grad_from_sums_kernel[(cdiv(T, block_t), cdiv(K, block_k), B)](
            G, codes, labels, stats, exp_sums.shift, exp_sums.ycoef, scale, seg_offsets, codes.shape[0], T, K,
            G.stride(1), 1 if scale.numel() > 1 else 0, NUM_BASIS=B, BLOCK_K=block_k, BLOCK_T=block_t, num_warps=4,
        )
    return G
