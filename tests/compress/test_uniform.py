"""SmallFry clipped uniform quantization: golden-section clip vs brute force, quantizer vs hand-written formulas."""

from __future__ import annotations

import pytest
import torch

from hf_basis.compress.uniform import find_clip_threshold, quantize_matrix, uniform_quantize

# --------------------------------------------------------------------------------------------------------------------
# Helpers (independent of the code under test: float64, written from the formulas in the SmallFry paper/code)
# --------------------------------------------------------------------------------------------------------------------


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Student-t(3) entries: a bulk near zero and a few large values, like trained word embeddings."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    chi2 = torch.randn(3, rows, cols, generator=g, dtype=torch.float64).square().sum(0)
    return (normal / (chi2 / 3).sqrt()).float()


def positions64(x: torch.Tensor, nbit: int, r: float) -> torch.Tensor:
    """(2^b - 1) * (clip(x, -r, r) + r) / (2r) in float64."""
    x = x.double().clamp(-r, r)
    return (2**nbit - 1) * (x + r) / (2 * r)


def reconstruct64(x: torch.Tensor, nbit: int, r: float) -> torch.Tensor:
    """Q_{b,r}(clip_r(x)) with round-half-to-even, float64."""
    return -r + torch.round(positions64(x, nbit, r)) * (2 * r / (2**nbit - 1))


def error64(x: torch.Tensor, nbit: int, r: float) -> float:
    if r == 0:
        return float(x.double().square().sum())
    return float((x.double() - reconstruct64(x, nbit, r)).square().sum())


# --------------------------------------------------------------------------------------------------------------------
# Clip threshold
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbit", [1, 2, 4, 8])
def test_golden_section_clip_matches_brute_force(nbit):
    x = heavy_tailed(400, 50)
    x_max = float(x.abs().max())
    grid = torch.linspace(0, x_max, 2001)[1:].tolist()
    best = min(error64(x, nbit, r) for r in grid)
    r = find_clip_threshold(x, nbit)
    assert 0 < r <= x_max
    assert error64(x, nbit, r) <= 1.01 * best


def test_clip_is_aggressive_at_low_bit_widths():
    # SmallFry's observation: the error-optimal clip shrinks with the bit-width on heavy-tailed data.
    x = heavy_tailed(400, 50, seed=1)
    clips = [find_clip_threshold(x, nbit) for nbit in (1, 2, 4, 8)]
    assert clips == sorted(clips)
    assert clips[0] < 0.25 * float(x.abs().max())


def test_clip_is_scale_invariant_and_handles_zeros():
    x = heavy_tailed(100, 20, seed=2)
    assert find_clip_threshold(1000 * x, 2) == pytest.approx(1000 * find_clip_threshold(x, 2), rel=1e-4)
    assert find_clip_threshold(torch.zeros(3, 4), 2) == 0.0


@pytest.mark.parametrize("kwargs, match", [({"nbit": 3}, "nbit"), ({"nbit": 32}, "nbit"), ({"tol": 0.0}, "tol")])
def test_clip_rejects_bad_arguments(kwargs, match):
    args = {"nbit": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        find_clip_threshold(torch.randn(4, 4), **args)
    with pytest.raises(ValueError, match="finite"):
        find_clip_threshold(torch.tensor([1.0, float("inf")]), 2)


# --------------------------------------------------------------------------------------------------------------------
# Uniform quantizer
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbit", [1, 2, 4, 8, 16])
def test_deterministic_quantizer_matches_formula(nbit):
    x = heavy_tailed(37, 23, seed=nbit)
    r = 0.6 * float(x.abs().max())
    indices, levels = uniform_quantize(x, nbit, r)
    assert indices.shape == x.shape
    assert indices.dtype == (torch.uint8 if nbit <= 8 else torch.int32)
    assert levels.dtype == torch.float32 and levels.shape == (2**nbit,)

    expected_levels = -r + torch.arange(2**nbit, dtype=torch.float64) * (2 * r / (2**nbit - 1))
    torch.testing.assert_close(levels.double(), expected_levels, rtol=0, atol=1e-6 * r)
    assert levels[0] == torch.tensor(-r, dtype=torch.float32) and levels[-1] == torch.tensor(r, dtype=torch.float32)

    pos = positions64(x, nbit, r)
    not_a_tie = (pos - pos.floor() - 0.5).abs() > 1e-3  # float32 vs float64 may break exact ties differently
    assert torch.equal(indices.long()[not_a_tie], torch.round(pos).long()[not_a_tie])


def test_deterministic_rounding_is_half_to_even():
    # nbit=2, r=1.5: levels -1.5, -0.5, 0.5, 1.5 and positions x + 1.5 (exact in binary).
    x = torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0])  # positions 0.5, 1.5, 2.5, clipped 0, clipped 3
    indices, levels = uniform_quantize(x, 2, 1.5)
    assert indices.tolist() == [0, 2, 2, 0, 3]
    assert levels[indices.long()].tolist() == [-1.5, 0.5, 0.5, -1.5, 1.5]


def test_stochastic_rounding_is_unbiased_and_reproducible():
    x = torch.full((200_000,), 0.3)
    r = 1.0  # nbit=2 levels: -1, -1/3, 1/3, 1 -> 0.3 rounds to -1/3 or 1/3
    indices, levels = uniform_quantize(x, 2, r, stochastic=True, generator=torch.Generator().manual_seed(0))
    values = levels[indices.long()]
    assert set(indices.unique().tolist()) == {1, 2}
    assert float(values.mean()) == pytest.approx(0.3, abs=0.01)
    # P(round up) = frac(position) = frac(1.3 * 1.5) = 0.95
    assert float((indices == 2).float().mean()) == pytest.approx(0.95, abs=0.01)

    again, _ = uniform_quantize(x, 2, r, stochastic=True, generator=torch.Generator().manual_seed(0))
    other, _ = uniform_quantize(x, 2, r, stochastic=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(indices, again)
    assert not torch.equal(indices, other)


def test_quantizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="nbit"):
        uniform_quantize(torch.randn(3), 3, 1.0)
    with pytest.raises(ValueError, match="r must be"):
        uniform_quantize(torch.randn(3), 2, 0.0)


# --------------------------------------------------------------------------------------------------------------------
# quantize_matrix: the SmallFry policy
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbit", [1, 2, 4, 8])
def test_few_distinct_values_are_stored_exactly(nbit):
    g = torch.Generator().manual_seed(nbit)
    values = torch.randn(2**nbit, generator=g) * 3  # any value set, not a uniform grid
    w = values[torch.randint(0, 2**nbit, (40, 9), generator=g)]
    q = quantize_matrix(w, nbit)
    assert q.clip is None
    assert torch.equal(q.levels[q.indices.long()], w)
    distinct = torch.unique(w)
    assert torch.equal(q.levels[: len(distinct)], distinct)  # sorted distinct values ...
    assert torch.all(q.levels[len(distinct) :] == 0)  # ... zero-padded to 2^nbit


@pytest.mark.parametrize("nbit", [1, 2, 4, 8])
def test_many_distinct_values_are_clipped_and_quantized(nbit):
    w = heavy_tailed(64, 30, seed=10 + nbit)
    q = quantize_matrix(w, nbit)
    r = find_clip_threshold(w, nbit)
    assert q.clip == r
    pos = positions64(w, nbit, r)
    not_a_tie = (pos - pos.floor() - 0.5).abs() > 1e-3
    recon = q.levels[q.indices.long()].double()
    torch.testing.assert_close(recon[not_a_tie], reconstruct64(w, nbit, r)[not_a_tie], rtol=0, atol=1e-6 * r)


def test_nbit_32_keeps_float32_bits_and_low_precision_inputs_work():
    w = heavy_tailed(5, 7)
    q = quantize_matrix(w, 32)
    assert q.indices.dtype == torch.int32 and torch.equal(q.indices.view(torch.float32), w) and q.clip is None
    for dtype in (torch.float16, torch.bfloat16):
        q = quantize_matrix(w.to(dtype), 2)
        assert q.levels.dtype == torch.float32
        assert q.clip == find_clip_threshold(w.to(dtype).float(), 2)


def test_quantize_matrix_stochastic_seed_and_errors():
    w = heavy_tailed(30, 30, seed=3)
    a = quantize_matrix(w, 2, stochastic=True, seed=5)
    b = quantize_matrix(w, 2, stochastic=True, seed=5)
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, quantize_matrix(w, 2).indices)
    with pytest.raises(ValueError, match="nbit"):
        quantize_matrix(w, 3)
    with pytest.raises(ValueError, match="finite"):
        quantize_matrix(torch.tensor([[float("nan"), 1.0]]), 2)
    with pytest.raises(ValueError, match="matrix"):
        quantize_matrix(torch.randn(3), 2)
