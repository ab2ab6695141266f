"""Product quantization (batched k-means): checked against planted clusters and hand-written references."""

from __future__ import annotations

import pytest
import torch

from hf_basis.compress import pq
from hf_basis.compress.pq import PQResult, code_dtype, product_quantize, reconstruct


# --------------------------------------------------------------------------------------------------------------------
# Helpers (independent of the code under test)
# --------------------------------------------------------------------------------------------------------------------


def planted(V: int, B: int, K: int, d: int, *, noise: float = 1e-3, seed: int = 0):
    """W (V, B*d) whose b-th sub-vectors are K well-separated centers plus tiny noise; labels (V, B) the centers.

    Centers are K scaled one-hot-ish directions shifted per sub-space: pairwise distance >= 10 * sqrt(2), noise 1e-3.
    Every label is used in every sub-space.
    """
    g = torch.Generator().manual_seed(seed)
    assert d >= K
    centers = torch.zeros(B, K, d)
    for b in range(B):
        perm = torch.randperm(d, generator=g)[:K]
        centers[b, torch.arange(K), perm] = 10.0
        centers[b] += torch.randn(d, generator=g)  # common shift: not centred at the origin
    labels = torch.stack([torch.randperm(V, generator=g) % K for _ in range(B)], dim=1)  # (V, B), all labels used
    sub = [centers[b, labels[:, b]] for b in range(B)]  # B x (V, d)
    W = torch.cat(sub, dim=1) + noise * torch.randn(V, B * d, generator=g)
    return W, labels


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two labelings of the same points induce the same partition (equal up to relabeling)."""
    a, b = a.long(), b.long()
    pairs = torch.unique(torch.stack([a, b], dim=1), dim=0)
    return len(pairs) == len(torch.unique(a)) == len(torch.unique(b))


def rel_err64(W: torch.Tensor, R: torch.Tensor) -> float:
    W64 = W.double()
    return float((W64 - R.double()).norm() / W64.norm())


def assert_codes_are_nearest(W: torch.Tensor, res: PQResult) -> None:
    """Each code must index a nearest centroid (brute force with cdist in float64; ties allowed)."""
    B, K, d = res.centroids.shape
    X = W.double().view(-1, B, d)
    for b in range(B):
        dist = torch.cdist(X[:, b], res.centroids[b].double())  # (V, K)
        chosen = dist.gather(1, res.codes[:, b].long()[:, None]).squeeze(1)
        assert torch.all(chosen <= dist.min(1).values + 1e-6 * (1 + dist.min(1).values))


# --------------------------------------------------------------------------------------------------------------------
# Core behaviour
# --------------------------------------------------------------------------------------------------------------------


def test_planted_clusters_recovered():
    V, B, K, d = 600, 4, 16, 24
    W, labels = planted(V, B, K, d)
    res = product_quantize(W, num_basis=B, num_clusters=K, seed=0)

    assert res.codes.shape == (V, B) and res.codes.dtype == torch.uint8
    assert res.centroids.shape == (B, K, d) and res.centroids.dtype == torch.float32
    for b in range(B):
        assert same_partition(res.codes[:, b], labels[:, b]), f"sub-space {b}: partition differs from planted one"
    assert res.relative_error < 1e-3
    assert res.relative_error == pytest.approx(rel_err64(W, reconstruct(res.codes, res.centroids)), rel=1e-5)
    assert_codes_are_nearest(W, res)


def test_random_matrix_codes_nearest_and_error_consistent():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(700, 32, generator=g)
    res = product_quantize(W, num_basis=4, num_clusters=32, seed=3)
    assert_codes_are_nearest(W, res)
    assert 0.0 < res.relative_error < 1.0
    assert res.relative_error == pytest.approx(rel_err64(W, reconstruct(res.codes, res.centroids)), rel=1e-5)
    # Lloyd never makes the objective worse than its k-means++ start (max_iter=0).
    start = product_quantize(W, num_basis=4, num_clusters=32, seed=3, max_iter=0)
    assert start.iterations == 0
    assert res.relative_error <= start.relative_error + 1e-7


def test_weight_not_modified():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(100, 8, generator=g)
    W_copy = W.clone()
    product_quantize(W, 2, 4)
    assert torch.equal(W, W_copy)


@pytest.mark.parametrize("code_type", [torch.uint8, torch.int16, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reconstruct_matches_loop(code_type, dtype):
    g = torch.Generator().manual_seed(4)
    V, B, K, d = 13, 3, 5, 4
    centroids = torch.randn(B, K, d, generator=g).to(dtype)
    codes = torch.randint(0, K, (V, B), generator=g).to(code_type)
    expected = torch.stack(
        [torch.cat([centroids[b, int(codes[w, b])] for b in range(B)]) for w in range(V)]
    )  # (V, B*d)
    out = reconstruct(codes, centroids)
    assert out.dtype == dtype and out.shape == (V, B * d)
    assert torch.equal(out, expected)


def test_reconstruct_rejects_bad_shapes():
    with pytest.raises(ValueError, match="num_basis=3"):
        reconstruct(torch.zeros(4, 2, dtype=torch.long), torch.zeros(3, 5, 2))
    with pytest.raises(TypeError, match="integer"):
        reconstruct(torch.zeros(4, 3), torch.zeros(3, 5, 2))


# --------------------------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------------------------


def test_same_seed_identical_results():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(2000, 64, generator=g)
    a = product_quantize(W, 8, 64, seed=11)
    b = product_quantize(W, 8, 64, seed=11)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.centroids, b.centroids)
    assert a.relative_error == b.relative_error
    c = product_quantize(W, 8, 64, seed=12)  # allowed to differ; must still be a valid, comparable solution
    assert c.codes.shape == a.codes.shape
    assert abs(c.relative_error - a.relative_error) < 0.05


def test_chunked_assignment_matches_unchunked(monkeypatch):
    g = torch.Generator().manual_seed(6)
    W = torch.randn(1000, 16, generator=g)
    full = product_quantize(W, 4, 8, seed=1)
    # 4 * 8 * 4 bytes per row -> 128 bytes: a 61-row budget gives many ragged chunks.
    monkeypatch.setattr(pq, "_CHUNK_BYTES", 61 * 128)
    assert pq._chunk_rows(4, 8) == 61
    chunked = product_quantize(W, 4, 8, seed=1)
    assert torch.equal(full.codes, chunked.codes)
    torch.testing.assert_close(full.centroids, chunked.centroids, rtol=1e-6, atol=1e-6)


def test_one_hot_sums_match_index_add():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(3, 50, 4, generator=g)
    codes = torch.randint(0, 6, (3, 50), generator=g)
    s1, n1 = pq._cluster_sums(X, codes, 6, use_one_hot=False)
    s2, n2 = pq._cluster_sums(X, codes, 6, use_one_hot=True)
    ref = torch.zeros(3, 6, 4)
    for b in range(3):
        for v in range(50):
            ref[b, codes[b, v]] += X[b, v]
    torch.testing.assert_close(s1, ref)
    torch.testing.assert_close(s2, ref)
    assert torch.equal(n1, n2) and int(n1.sum()) == 150


# --------------------------------------------------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------------------------------------------------


def test_fewer_rows_than_clusters():
    g = torch.Generator().manual_seed(8)
    W = torch.randn(5, 8, generator=g)
    res = product_quantize(W, num_basis=2, num_clusters=16)
    assert torch.isfinite(res.centroids).all()
    assert res.relative_error < 1e-6
    for b in range(2):
        sub = W[:, 4 * b : 4 * (b + 1)]
        assert len(torch.unique(res.codes[:, b])) == 5  # each distinct row has its own centroid
        # every centroid (surplus ones included) is a copy of one of the rows
        dist = torch.cdist(res.centroids[b].double(), sub.double())  # (K, V)
        assert torch.all(dist.min(1).values < 1e-6)


def test_all_rows_identical():
    row = torch.tensor([1.0, -2.0, 3.0, 0.5, 7.0, -1.0])
    W = row.repeat(100, 1)
    res = product_quantize(W, num_basis=3, num_clusters=4)
    assert torch.isfinite(res.centroids).all()
    assert res.relative_error < 1e-6
    assert torch.allclose(res.centroids, row.view(3, 1, 2).expand(3, 4, 2))  # every centroid is a copy of the row
    assert (res.codes == res.codes[0]).all()


def test_all_zero_weight():
    res = product_quantize(torch.zeros(20, 4), num_basis=2, num_clusters=3)
    assert res.relative_error == 0.0
    assert torch.equal(res.centroids, torch.zeros(2, 3, 2))


def test_many_duplicates():
    g = torch.Generator().manual_seed(9)
    distinct = torch.randn(10, 12, generator=g)
    idx = torch.randperm(300, generator=g) % 10
    W = distinct[idx]  # 300 rows, 10 distinct values
    # more clusters than distinct rows: exact
    res = product_quantize(W, num_basis=3, num_clusters=16)
    assert torch.isfinite(res.centroids).all()
    assert res.relative_error < 1e-6
    for b in range(3):
        assert same_partition(res.codes[:, b], idx)
    # fewer clusters than distinct rows: still finite and identical rows share codes
    res = product_quantize(W, num_basis=3, num_clusters=4)
    assert torch.isfinite(res.centroids).all()
    assert 0.0 < res.relative_error < 1.0
    for v in range(10):
        rows = res.codes[idx == v]
        assert (rows == rows[0]).all()


def test_update_reseeds_empty_clusters_from_farthest_points():
    # Sub-space 0: cluster 1 is empty; sub-space 1: clusters 0 and 2 are empty.
    X = torch.tensor(
        [
            [[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [0.0, 1.0]],
            [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [9.0, 9.0]],
        ]
    )  # (B=2, V=4, d=2)
    codes = torch.tensor([[0, 0, 2, 0], [1, 1, 1, 1]])
    min_dist = torch.tensor([[0.1, 0.5, 0.0, 0.3], [4.0, 1.0, 0.5, 30.0]])
    centroids, num_empty = pq._update(X, codes, min_dist, K=3)
    assert num_empty == 3
    expected = torch.tensor(
        [
            [[1 / 3, 1 / 3], [1.0, 0.0], [5.0, 5.0]],  # mean; farthest point (dist 0.5); mean of the single point
            [[9.0, 9.0], [3.75, 3.75], [1.0, 1.0]],  # farthest; mean of all four; second farthest
        ]
    )
    torch.testing.assert_close(centroids, expected)


def test_update_more_empty_clusters_than_points():
    X = torch.tensor([[[0.0], [4.0]]])  # (1, 2, 1)
    codes = torch.tensor([[0, 0]])
    centroids, num_empty = pq._update(X, codes, torch.tensor([[4.0, 4.0]]), K=5)
    assert num_empty == 4
    assert torch.isfinite(centroids).all()
    assert centroids[0, 0, 0] == 2.0
    assert set(centroids[0, 1:, 0].tolist()) <= {0.0, 4.0}  # copies of existing points


def test_lloyd_splits_duplicated_initial_centroids():
    # Two blobs per sub-space; both initial centroids sit on blob A, so cluster 1 starts empty.
    g = torch.Generator().manual_seed(10)
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([20.0, -5.0])
    pts = torch.cat([a + 0.01 * torch.randn(30, 2, generator=g), b + 0.01 * torch.randn(30, 2, generator=g)])
    X = torch.stack([pts, pts.flip(0)])  # (B=2, V=60, d=2)
    init = a.expand(2, 2, 2).clone()  # (B, K=2, d), duplicated centroids
    centroids, codes, min_dist, iterations = pq._lloyd(X, init, max_iter=10, tol=1e-4)
    assert iterations >= 1
    truth = torch.cat([torch.zeros(30), torch.ones(30)]).long()
    assert same_partition(codes[0], truth) and same_partition(codes[1], truth.flip(0))
    assert float(min_dist.max()) < 1e-3


def test_kmeans_pp_no_nan_when_points_coincide():
    g = torch.Generator().manual_seed(11)
    X = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat(1, 10, 1).view(1, 20, 2)  # two distinct points, 10 copies each
    C = pq._kmeans_pp_init(X, 6, g)
    assert torch.isfinite(C).all()
    # both distinct points are chosen before any duplicate; the rest are copies
    assert {tuple(r) for r in C[0, :2].tolist()} == {(1.0, 2.0), (3.0, 4.0)}
    assert {tuple(r) for r in C[0].tolist()} == {(1.0, 2.0), (3.0, 4.0)}


# --------------------------------------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------------------------------------


def test_code_dtype_boundaries():
    assert code_dtype(2) == torch.uint8
    assert code_dtype(256) == torch.uint8
    assert code_dtype(257) == torch.int16
    assert code_dtype(32768) == torch.int16
    with pytest.raises(ValueError, match="32768"):
        code_dtype(32769)
    with pytest.raises(ValueError, match="num_clusters"):
        code_dtype(0)


def test_codes_dtype_in_results():
    g = torch.Generator().manual_seed(12)
    W = torch.randn(300, 4, generator=g)
    r256 = product_quantize(W, 2, 256, max_iter=2)
    r257 = product_quantize(W, 2, 257, max_iter=2)
    assert r256.codes.dtype == torch.uint8
    assert r257.codes.dtype == torch.int16
    assert int(r257.codes.min()) >= 0 and int(r257.codes.max()) < 257
    assert r257.centroids.shape == (2, 257, 2)
    with pytest.raises(ValueError, match="num_clusters"):
        product_quantize(W, 2, 32769)
    with pytest.raises(ValueError, match="num_clusters"):
        product_quantize(W, 2, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_inputs(dtype):
    V, B, K, d = 400, 2, 8, 8
    W, labels = planted(V, B, K, d, noise=1e-2)
    W = W.to(dtype)
    res = product_quantize(W, B, K)
    # float32 work, or float64 for a float64 weight (float32 would round its rows)
    assert res.centroids.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert res.codes.dtype == torch.uint8
    for b in range(B):
        assert same_partition(res.codes[:, b], labels[:, b])
    assert res.relative_error < 1e-2
    assert res.relative_error == pytest.approx(rel_err64(W, reconstruct(res.codes, res.centroids)), rel=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------------------------------


def test_num_basis_must_divide_dim_lists_divisors():
    W = torch.randn(10, 12)
    with pytest.raises(ValueError) as info:
        product_quantize(W, num_basis=5, num_clusters=4)
    msg = str(info.value)
    assert "num_basis" in msg and "[1, 2, 3, 4, 6, 12]" in msg
    with pytest.raises(ValueError, match="num_basis"):
        product_quantize(W, num_basis=0, num_clusters=4)


def test_bad_weight_and_options():
    with pytest.raises(ValueError, match="2-D"):
        product_quantize(torch.randn(12), 2, 4)
    with pytest.raises(TypeError, match="floating"):
        product_quantize(torch.ones(10, 4, dtype=torch.long), 2, 4)
    with pytest.raises(ValueError, match="NaN"):
        product_quantize(torch.full((10, 4), float("nan")), 2, 4)
    with pytest.raises(ValueError, match="max_iter"):
        product_quantize(torch.randn(10, 4), 2, 4, max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        product_quantize(torch.randn(10, 4), 2, 4, tol=-1.0)
    with pytest.raises(ValueError, match="num_basis"):
        product_quantize(torch.randn(10, 4), 2.0, 4)


# --------------------------------------------------------------------------------------------------------------------
# Weighted k-means (sample_weight)
# --------------------------------------------------------------------------------------------------------------------


def weighted_objective(W: torch.Tensor, result: PQResult, w: torch.Tensor) -> float:
    """sum_v w[v] * ||W[v] - decode[v]||^2, in float64."""
    err = (W.double() - reconstruct(result.codes, result.centroids).double()).square().sum(1)  # (V,)
    return float((err * w.double()).sum())


def heavy_point_data():
    """1-D data: 101 light points evenly on [-1, 1] and one point at 1.5 weighing 10^4 times as much.

    Unweighted, K=2 splits the light points (centroids near -0.5 and 0.55: splitting costs ~100/12 + the heavy
    point's ~0.9, a centroid on 1.5 costs ~100/3). Weighted, missing the heavy point costs >= 10^4 * 0.9, so one
    centroid sits on it, pulled off by only the few light points nearest to it (~12 points of weight 1 around 0.9:
    about 0.0007).
    """
    light = torch.linspace(-1.0, 1.0, 101)
    W = torch.cat([light, torch.tensor([1.5])]).unsqueeze(1)  # (102, 1)
    w = torch.ones(102)
    w[-1] = 1e4
    return W, w


@pytest.mark.parametrize("seed", range(5))
def test_weighting_puts_a_centroid_on_the_heavy_point(seed):
    W, w = heavy_point_data()
    weighted = product_quantize(W, 1, 2, seed=seed, sample_weight=w)
    unweighted = product_quantize(W, 1, 2, seed=seed)
    c_w = weighted.centroids[0, :, 0]  # (K,)
    c_u = unweighted.centroids[0, :, 0]  # (K,)
    assert float((c_w - 1.5).abs().min()) < 2e-3
    assert float((c_u - 1.5).abs().min()) > 0.5
    # the heavy point is decoded almost exactly only when weighted
    assert abs(float(reconstruct(weighted.codes, weighted.centroids)[-1, 0]) - 1.5) < 2e-3
    # and each solution is the better one for the objective it minimises
    assert weighted_objective(W, weighted, w) < weighted_objective(W, unweighted, w)
    assert weighted_objective(W, unweighted, torch.ones(102)) < weighted_objective(W, weighted, torch.ones(102))


def test_zero_weight_light_points_leave_centroid_exactly_on_heavy_point():
    # With the light points near it at weight 0, the heavy point's cluster mean is exactly the heavy point.
    W, w = heavy_point_data()
    w[:101][W[:101, 0] > 0.5] = 0.0
    result = product_quantize(W, 1, 2, seed=0, sample_weight=w)
    assert 1.5 in result.centroids[0, :, 0].tolist()


@pytest.mark.parametrize(
    "make_weights",
    [
        lambda V: torch.ones(V),
        lambda V: torch.full((V,), 0.25, dtype=torch.float64),
        lambda V: torch.full((V,), 7, dtype=torch.long),  # integer counts
        lambda V: [3.0] * V,  # a plain sequence
    ],
)
def test_constant_weights_are_bit_identical_to_unweighted(make_weights):
    W, _ = planted(200, 4, 8, 8, noise=0.5, seed=21)
    W = W + 0.3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1))
    ref = product_quantize(W, 4, 8, seed=3)
    out = product_quantize(W, 4, 8, seed=3, sample_weight=make_weights(200))
    assert torch.equal(ref.codes, out.codes)
    assert torch.equal(ref.centroids, out.centroids)
    assert ref.relative_error == out.relative_error and ref.iterations == out.iterations


def test_weighted_lloyd_with_unit_weights_matches_unweighted_lloyd():
    # The weighted code path itself (product_quantize short-cuts constant weights): from the same start, unit
    # weights give the same assignments; centroids agree to rounding (weighted sums round differently).
    g = torch.Generator().manual_seed(5)
    X = torch.randn(3, 400, 4, generator=g)  # (B, V, d)
    init = X[:, :16].clone()  # (B, K=16, d)
    c_u, codes_u, dist_u, it_u = pq._lloyd(X, init, max_iter=15, tol=0.0)
    c_w, codes_w, dist_w, it_w = pq._lloyd(X, init, max_iter=15, tol=0.0, weights=torch.ones(400))
    assert torch.equal(codes_u, codes_w) and it_u == it_w
    torch.testing.assert_close(c_u, c_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dist_u, dist_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_one_hot", [False, True])
def test_weighted_cluster_sums_match_reference(use_one_hot):
    g = torch.Generator().manual_seed(8)
    X = torch.randn(2, 40, 3, generator=g)  # (B, V, d)
    w = torch.rand(40, generator=g)
    codes = torch.randint(0, 5, (2, 40), generator=g)
    sums, _ = pq._cluster_sums(pq._weighted_points(X, w), codes, 5, use_one_hot=use_one_hot)  # (B, K, d + 1)
    ref = torch.zeros(2, 5, 4)
    for b in range(2):
        for v in range(40):
            ref[b, codes[b, v], :3] += w[v] * X[b, v]
            ref[b, codes[b, v], 3] += w[v]
    torch.testing.assert_close(sums, ref)


def test_weighted_update_reseeds_zero_weight_clusters():
    # Cluster 1 holds only a weight-0 point: it counts as empty and takes the point of largest weight * distance.
    X = torch.tensor([[[0.0], [1.0], [10.0], [4.0]]])  # (B=1, V=4, d=1)
    w = torch.tensor([1.0, 3.0, 0.0, 2.0])
    codes = torch.tensor([[0, 0, 1, 0]])
    min_dist = torch.tensor([[1.0, 0.0, 0.0, 9.0]])  # weighted cost: 1, 0, 0, 18
    centroids, num_empty = pq._update(X, codes, min_dist, 2, w, pq._weighted_points(X, w))
    assert num_empty == 1
    torch.testing.assert_close(centroids[0, :, 0], torch.tensor([(0.0 + 3.0 + 8.0) / 6.0, 4.0]))


def test_zero_weights_no_nan_and_positive_rows_kept():
    g = torch.Generator().manual_seed(9)
    W = torch.randn(300, 8, generator=g)
    w = torch.zeros(300)
    w[[3, 100, 250]] = torch.tensor([5.0, 1.0, 0.5])  # fewer weighted rows than clusters
    result = product_quantize(W, 2, 8, seed=0, sample_weight=w)
    assert torch.isfinite(result.centroids).all()
    assert int(result.codes.long().max()) < 8
    decoded = reconstruct(result.codes, result.centroids)
    torch.testing.assert_close(decoded[[3, 100, 250]], W[[3, 100, 250]])  # each got its own centroid
    # some zero weights among many positive ones: still finite, and rerunning is deterministic
    w2 = torch.rand(300, generator=g)
    w2[::4] = 0.0
    a = product_quantize(W, 2, 8, seed=4, sample_weight=w2)
    b = product_quantize(W, 2, 8, seed=4, sample_weight=w2)
    assert torch.isfinite(a.centroids).all()
    assert torch.equal(a.codes, b.codes) and torch.equal(a.centroids, b.centroids)


def test_weighted_relative_error_is_unweighted_and_frequency_weighting_helps_frequent_rows():
    g = torch.Generator().manual_seed(12)
    W = torch.randn(2000, 16, generator=g)
    zipf = 1.0 / torch.arange(1, 2001, dtype=torch.float64)  # word frequencies ~ 1 / rank
    weighted = product_quantize(W, 4, 16, seed=0, sample_weight=zipf)
    plain = product_quantize(W, 4, 16, seed=0)
    exact = float((W - reconstruct(weighted.codes, weighted.centroids)).norm() / W.norm())
    assert weighted.relative_error == pytest.approx(exact, rel=1e-5)
    assert weighted.relative_error > plain.relative_error  # unweighted error: the plain fit is better at it
    assert weighted_objective(W, weighted, zipf) < weighted_objective(W, plain, zipf)


@pytest.mark.parametrize(
    "sample_weight, match",
    [
        (torch.ones(99), r"sample_weight must have shape \(100,\)"),
        (torch.ones(100, 1), r"sample_weight must have shape \(100,\)"),
        (torch.tensor([float("nan")] + [1.0] * 99), "sample_weight contains NaN or infinite"),
        (torch.tensor([float("inf")] + [1.0] * 99), "sample_weight contains NaN or infinite"),
        (torch.tensor([-1.0] + [1.0] * 99), "sample_weight must be non-negative"),
        (torch.zeros(100), "sample_weight is all zero"),
        (torch.ones(100, dtype=torch.bool), "sample_weight must hold real numbers"),
        ("abc", "sample_weight must be"),
    ],
)
def test_bad_sample_weight(sample_weight, match):
    W = torch.randn(100, 8)
    with pytest.raises(ValueError, match=match):
        product_quantize(W, 2, 4, sample_weight=sample_weight)
