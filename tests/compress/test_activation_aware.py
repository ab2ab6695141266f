"""Activation-aware PQ refinement against dense computations of its objective sum_w f_w e_w^T M e_w."""

import pytest
import torch

from hf_basis.compress.activation_aware import refine_pq, weighted_output_error
from hf_basis.compress.pq import product_quantize, reconstruct


def dense_objective(W, codes, C, M, f):
    """Independent oracle: the mean-square logit error over inputs with second moment M, weighted per row."""
    E = W.double() - reconstruct(codes, C).double()
    return float((((E @ M.double()) * E).sum(dim=1) * f.double()).sum())


def correlated_problem(V=400, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g)
    A = torch.randn(D, D, generator=g) * torch.linspace(0.1, 3.0, D)  # strong, anisotropic cross-correlations
    H = torch.randn(5000, D, generator=g) @ A.T
    M = H.T @ H / H.shape[0]
    f = torch.rand(V, generator=g) ** 3 + 1e-3
    return W, M, f


def test_refinement_lowers_the_output_error_and_never_increases_it():
    W, M, f = correlated_problem()
    pq = product_quantize(W, num_basis=3, num_clusters=8, seed=0, sample_weight=f)
    before = dense_objective(W, pq.codes, pq.centroids, M, f)
    codes, C, history = refine_pq(W, pq.codes, pq.centroids, M, f, sweeps=6)
    after = dense_objective(W, codes, C, M, f)
    assert codes.dtype == pq.codes.dtype and codes.shape == pq.codes.shape and C.shape == pq.centroids.shape
    assert int(codes.min()) >= 0 and int(codes.max()) < 8
    assert history[0] == pytest.approx(before, rel=1e-4) and history[-1] == pytest.approx(after, rel=1e-4)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:]))
    assert after < 0.8 * before  # k-means ignores M; the refinement uses it
    assert weighted_output_error(W, reconstruct(codes, C), M, f) == pytest.approx(after, rel=1e-4)


def test_identity_moment_is_plain_kmeans():
    """With M = I and uniform weights the objective is k-means' own: refining a converged k-means changes nothing
    material (it can only go down)."""
    W, _, _ = correlated_problem(seed=1)
    pq = product_quantize(W, num_basis=4, num_clusters=6, seed=0, max_iter=200, tol=0.0)
    sse = float((W - reconstruct(pq.codes, pq.centroids)).square().sum())
    _, _, history = refine_pq(W, pq.codes, pq.centroids, torch.eye(12), sweeps=2)
    assert history[0] == pytest.approx(sse, rel=1e-4)
    assert history[-1] <= history[0] * (1 + 1e-6) and history[-1] >= 0.95 * history[0]


def test_exactly_representable_weight_stays_exact():
    g = torch.Generator().manual_seed(2)
    C = torch.randn(2, 5, 3, generator=g)
    codes = torch.randint(0, 5, (60, 2), generator=g).to(torch.uint8)
    W = reconstruct(codes, C)
    _, M, _ = correlated_problem(D=6, seed=3)
    new_codes, new_C, history = refine_pq(W, codes, C, M, sweeps=3)
    assert history[-1] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(reconstruct(new_codes, new_C), W, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused():
    W, M, _ = correlated_problem(V=50, D=12)
    pq = product_quantize(W, num_basis=3, num_clusters=4)
    with pytest.raises(ValueError, match=r"moment must be \(12, 12\)"):
        refine_pq(W, pq.codes, pq.centroids, M[:6, :6])
    with pytest.raises(ValueError, match="do not fit"):
        refine_pq(W[:, :9], pq.codes, pq.centroids, M)
    with pytest.raises(ValueError, match="sweeps"):
        refine_pq(W, pq.codes, pq.centroids, M, sweeps=-1)
