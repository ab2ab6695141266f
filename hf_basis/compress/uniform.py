"""SmallFry clipped uniform quantization (May et al., NeurIPS 2019): one clip threshold r for the whole matrix.

    Q_{b,r}(x) = levels[round((2^b - 1) * (clip(x, -r, r) + r) / (2r))],   levels = linspace(-r, r, 2^b)

2^b levels equally spaced over [-r, r], both endpoints included (b=1 gives {-r, +r}; zero is never a level).
r is chosen by a golden-section search that minimises the squared Frobenius reconstruction error, always with
deterministic rounding, as the original `find_optimal_range` does. Low bit-widths clip aggressively (r far below
max|x|) because the bulk of a heavy-tailed matrix matters more than its few large entries.

Everything runs in float32 (level positions in float64 at 16 bits) on the input's device with torch ops only (the
original was numpy-only and crashed on numpy >= 1.24).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hf_basis.validation import check_nbit

__all__ = [
    "QUANTIZE_NBITS",
    "QuantizedMatrix",
    "find_clip_threshold",
    "index_dtype",
    "nearest_levels",
    "quantize_matrix",
    "uniform_quantize",
]

QUANTIZE_NBITS = (1, 2, 4, 8, 16)
"""Bit-widths the uniform quantizer handles (2^nbit levels); storage also allows 32 (float32 kept as is)."""

# Elements per chunk when evaluating the clip error, so that the search over a (V, D) matrix needs O(chunk) scratch
# memory instead of several copies of the matrix.
_ERROR_CHUNK = 1 << 22


def _check_quantize_nbit(nbit: int) -> None:
    if nbit not in QUANTIZE_NBITS:
        raise ValueError(f"nbit must be one of {QUANTIZE_NBITS} for uniform quantization, got {nbit!r}")


def index_dtype(nbit: int) -> torch.dtype:
    """Integer dtype of level indices for `nbit`: uint8 up to 8 bits, int32 for 16 bits (and float32 bits at 32)."""
    return torch.uint8 if nbit <= 8 else torch.int32


def _levels(nbit: int, r: float, device: torch.device) -> torch.Tensor:
    """The 2^nbit levels, float32 (2^nbit,); linspace makes both endpoints exactly -r and +r."""
    return torch.linspace(-r, r, 2**nbit, dtype=torch.float32, device=device)


def _level_positions(x: torch.Tensor, nbit: int, r: float) -> torch.Tensor:
    """Clip x to [-r, r] and map it affinely onto [0, 2^nbit - 1] (same shape as x).

    float32, except float64 at 16 bits: float32 rounding of x + r is worth ~0.01 of a step out of 65535 steps.
    """
    steps = 2**nbit - 1
    dtype = torch.float64 if nbit > 8 else torch.float32
    return (x.to(dtype).clamp(-r, r) + r) * (steps / (2 * r))


def _squared_error(x_flat: torch.Tensor, nbit: int, r: float) -> float:
    """||x - Q_{nbit,r}(clip_r(x))||_F^2 with deterministic rounding; r = 0 quantizes everything to zero."""
    if r <= 0:
        return float(x_flat.float().square().sum())
    step = 2 * r / (2**nbit - 1)
    total = 0.0
    for chunk in x_flat.split(_ERROR_CHUNK):
        chunk = chunk.float()
        recon = _level_positions(chunk, nbit, r).round_() * step - r  # same grid as _levels, up to float rounding
        total += float((chunk - recon).square_().sum())
    return total


def find_clip_threshold(x: torch.Tensor, nbit: int, tol: float = 1e-2) -> float:
    """Clip threshold r in (0, max|x|] minimising ||x - Q_{nbit,r}(clip_r(x))||_F^2 (deterministic rounding).

    Golden-section search over [0, max|x|] (assumes the error is unimodal in r, as SmallFry does), stopped once the
    bracket is narrower than `tol * max|x|`; returns the best of the final bracket's four points, excluding r = 0.
    Unlike the original, whose tol was absolute (in the units of x), `tol` is relative to max|x| so the search is
    scale-invariant. Each step costs one pass over x.

    Args:
        x: tensor of any shape and floating dtype (computed in float32 on x's device).
        nbit: bits per value, one of (1, 2, 4, 8, 16).
        tol: bracket width at which the search stops, as a fraction of max|x|; must be in (0, 1).

    Returns:
        r as a Python float; 0.0 when x is all zeros.
    """
    _check_quantize_nbit(nbit)
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1) (a fraction of max|x|), got {tol!r}")
    x_flat = x.detach().reshape(-1)
    if x_flat.numel() == 0:
        raise ValueError("x must not be empty")
    x_max = float(x_flat.abs().max())
    if not math.isfinite(x_max):
        raise ValueError("x must be finite (it holds inf or nan)")
    if x_max == 0:
        return 0.0

    def error(r: float) -> float:
        return _squared_error(x_flat, nbit, r)

    ratio = (math.sqrt(5) - 1) / 2
    a, b = 0.0, x_max
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fb, fc, fd = error(b), error(c), error(d)
    while b - a > tol * x_max:
        if fc < fd:  # minimum in [a, d]: d becomes the new right end, c the new inner right point
            b, fb = d, fd
            d, fd = c, fc
            c = b - ratio * (b - a)
            fc = error(c)
        else:  # minimum in [c, b]
            a = c
            c, fc = d, fd
            d = a + ratio * (b - a)
            fd = error(d)
    candidates = [(fc, c), (fd, d), (fb, b)]
    if a > 0:
        candidates.append((error(a), a))
    return min(candidates)[1]


def uniform_quantize(
    x: torch.Tensor,
    nbit: int,
    r: float,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip x to [-r, r] and round it onto 2^nbit levels equally spaced over [-r, r] (both endpoints included).

    Deterministic rounding is round-half-to-even (torch.round). Stochastic rounding rounds the position v up with
    probability frac(v), so E[levels[idx]] = clip(x) (unbiased); it draws from `generator` (on x's device) or, if
    None, the global RNG.

    Args:
        x: tensor of any shape and floating dtype (computed in float32 on x's device).
        nbit: bits per value, one of (1, 2, 4, 8, 16).
        r: clip threshold, > 0.

    Returns:
        indices: level indices, same shape as x, uint8 for nbit <= 8 and int32 for nbit = 16.
        levels: float32 (2^nbit,) table, levels[i] = -r + i * 2r / (2^nbit - 1); the reconstruction is levels[indices].
    """
    _check_quantize_nbit(nbit)
    if not (r > 0 and math.isfinite(r)):
        raise ValueError(f"r must be a finite positive clip threshold, got {r!r}")
    v = _level_positions(x.detach(), nbit, r)  # (x.shape) in [0, 2^nbit - 1]
    if stochastic:
        noise = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)  # U[0, 1)
        v = v.add_(noise).floor_()
    else:
        v = v.round_()
    indices = v.clamp_(0, 2**nbit - 1).to(index_dtype(nbit))
    return indices, _levels(nbit, r, x.device)


def nearest_levels(x: torch.Tensor, levels: torch.Tensor, nbit: int) -> torch.Tensor:
    """Index of the nearest entry of an existing level table for each value of x (new rows of a quantized matrix).

    x: (n, D) floating; levels: float32 (2^nbit,) as `quantize_matrix` returns them (uniform, or the sorted distinct
    values zero-padded: not necessarily sorted, so this searches them all), (0,) for nbit = 32. Returns (n, D)
    indices in `index_dtype(nbit)`; for nbit = 32 the int32 bit pattern of x in float32, as `quantize_matrix`.
    """
    check_nbit(nbit)
    w = x.detach().to(levels.device, torch.float32)
    if nbit == 32:
        return w.contiguous().view(torch.int32)
    flat = w.reshape(-1)
    indices = torch.empty(flat.shape, dtype=torch.long, device=flat.device)
    step = max(1, _ERROR_CHUNK // levels.numel())  # values per chunk: a (step, 2^nbit) distance block
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step, None]  # (n_chunk, 1)
        indices[start : start + step] = (chunk - levels[None, :]).abs().argmin(dim=1)
    return indices.reshape(w.shape).to(index_dtype(nbit))


@dataclass
class QuantizedMatrix:
    """Result of `quantize_matrix`.

    indices: (V, D) level indices, uint8 for nbit <= 8, int32 for 16; for nbit = 32 the int32 bit pattern of the
        float32 values (`indices.view(torch.float32)` recovers them).
    levels: float32 (2^nbit,) level table (empty (0,) for nbit = 32); the reconstruction is levels[indices].
    clip: the clip threshold r, or None when nothing was clipped (exact storage of few distinct values, or nbit 32).
    """

    indices: torch.Tensor
    levels: torch.Tensor
    clip: float | None


def quantize_matrix(
    weight: torch.Tensor, nbit: int, *, stochastic: bool = False, seed: int | None = None
) -> QuantizedMatrix:
    """The full SmallFry policy for one matrix, on weight's device, in float32 whatever weight's dtype.

    - nbit = 32: no quantization; the float32 values are kept bit-exactly.
    - weight holds <= 2^nbit distinct values: they are stored exactly (levels = sorted distinct values, zero-padded
      to 2^nbit), with no clipping — an already-quantized matrix survives unchanged.
    - otherwise: r = find_clip_threshold(weight, nbit) (deterministic search) and uniform_quantize at r, with
      deterministic or (if `stochastic`) stochastic rounding seeded by `seed` (None: the global RNG).

    Args:
        weight: (V, D) floating tensor with finite values.
        nbit: one of (1, 2, 4, 8, 16, 32).
    """
    check_nbit(nbit)
    if weight.dim() != 2:
        raise ValueError(f"weight must be a (num_embeddings, embedding_dim) matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight must be finite (it holds inf or nan)")
    if nbit == 32:
        return QuantizedMatrix(w.contiguous().view(torch.int32), torch.empty(0, device=w.device), None)

    num_levels = 2**nbit
    distinct, inverse = torch.unique(w, sorted=True, return_inverse=True)
    if distinct.numel() <= num_levels:
        levels = torch.zeros(num_levels, dtype=torch.float32, device=w.device)
        levels[: distinct.numel()] = distinct
        return QuantizedMatrix(inverse.to(index_dtype(nbit)), levels, None)
    del distinct, inverse

    r = find_clip_threshold(w, nbit)
    generator = None
    if stochastic and seed is not None:
        generator = torch.Generator(device=w.device).manual_seed(seed)
    indices, levels = uniform_quantize(w, nbit, r, stochastic=stochastic, generator=generator)
    return QuantizedMatrix(indices, levels, r)
