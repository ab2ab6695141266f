"""Product quantization of a (V, D) matrix with batched k-means.

Each row is cut into `num_basis` contiguous sub-vectors of width d = D / num_basis. In every sub-space b a k-means
codebook of `num_clusters` (K) centroids is fitted, and row w is stored as the B integer codes
code[w, b] = index of the centroid nearest to its b-th sub-vector. Decoding concatenates the chosen centroids.

All B sub-spaces are fitted at once: the data is laid out as X (B, V, d) and the codebooks as C (B, K, d), so every
step of Lloyd's algorithm is one batched matmul / reduction instead of a Python loop over sub-spaces. Everything runs
on the weight's device in float32 (float64 for a float64 weight, whose precision float32 would silently drop).

Algorithm
---------
1. k-means++ seeding, batched over sub-spaces. It is inherently sequential in K (each pick depends on the previous
   ones) and costs O(K * S * d * B) for S seeding rows, so it runs on a random subsample of
   S = min(V, `_INIT_ROWS_PER_CLUSTER` * K) rows (the same rows for every sub-space). Lloyd's iterations then use all
   V rows, so the subsample only affects where the iterations start. With `sample_weight` the subsample is S draws
   proportional to the weights (with replacement; each distinct row then weighs its number of draws), so that it
   stands for the weighted distribution: a uniform subsample would often leave out the few heavy rows that the
   weights exist for, and they would not be seeded.
2. Lloyd iterations: assign each sub-vector to its nearest centroid with the ||x||^2 - 2 x.c + ||c||^2 matmul trick,
   chunked over V so the (B, chunk, K) distance block stays under `_CHUNK_BYTES`; move each centroid to the mean of
   its points; re-seed empty clusters from the points farthest from their centroid (per sub-space).
   Stop when the objective (sum of squared distances) decreases by less than `tol` relative, or after `max_iter`.

Weighted k-means (`sample_weight`, one non-negative weight per row, e.g. a word's corpus frequency) minimises
sum_w weight[w] * ||x_w - c(x_w)||^2 instead: k-means++ draws with probability proportional to weight * D^2 (the
first pick proportional to weight), each centroid moves to the weighted mean of its points, a cluster whose points
weigh 0 in total counts as empty, and the stopping rule reads the weighted objective. The words a model sees most get
the most accurate rows, which is what the loss cares about. Weights are shared by all sub-spaces (they weigh rows).

Degenerate inputs are handled without NaN: with fewer distinct rows than K (V < K, duplicate rows), k-means++ gives
each distinct row its own centroid and the surplus centroids become copies of existing rows.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from hf_basis.validation import MAX_CLUSTERS, as_row_weights, divisors

__all__ = ["PQResult", "code_dtype", "encode", "product_quantize", "reconstruct", "relative_error"]

# Upper bound on one (B, chunk, K) fp32 distance block; the chunk over V is sized from it so memory stays bounded
# whatever the vocabulary size.
_CHUNK_BYTES = 256 * 2**20
# k-means++ runs on at most this many rows per cluster (a random subsample): seeding is O(K * S * d * B) and
# sequential in K, so on a 50k-row vocabulary seeding on all rows would cost as much as many Lloyd iterations while
# the iterations that follow move the centroids anyway.
_INIT_ROWS_PER_CLUSTER = 20


def code_dtype(num_clusters: int) -> torch.dtype:
    """Smallest integer dtype holding codes in [0, num_clusters).

    torch.uint8 for num_clusters <= 256, torch.int16 for num_clusters <= 32768 (torch has no uint16 arithmetic on
    all devices, and int16 holds 0..32767). Raises ValueError outside [1, 32768].
    """
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 1 <= num_clusters <= MAX_CLUSTERS:
        raise ValueError(
            f"num_clusters must be an integer in [1, {MAX_CLUSTERS}] to be stored as codes, got {num_clusters!r}"
        )
    return torch.uint8 if num_clusters <= 256 else torch.int16


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype k-means runs in for a weight of `dtype`: float32 (enough for fp16 / bf16 / fp32), float64 for
    float64 (float32 would silently round a float64 model's rows)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class PQResult:
    """Output of `product_quantize`.

    codes: (V, num_basis) in `code_dtype(num_clusters)`, on the weight's device; codes[w, b] indexes centroids[b].
    centroids: (num_basis, num_clusters, D // num_basis) float32 (float64 for a float64 weight), on weight's device.
    relative_error: ||W - reconstruct(codes, centroids)||_F / ||W||_F, computed exactly in that dtype
        (0.0 for an all-zero W).
    iterations: Lloyd iterations run (0 when max_iter=0: k-means++ seeding plus one assignment).
    """

    codes: torch.Tensor
    centroids: torch.Tensor
    relative_error: float
    iterations: int = 0


def reconstruct(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Dense (V, D) decode: row w = concat_b centroids[b, codes[w, b]], in centroids' dtype.

    codes: (V, B) integer tensor; centroids: (B, K, d). Returns (V, B * d) on centroids' device.
    """
    if centroids.dim() != 3:
        raise ValueError(f"centroids must be (num_basis, num_clusters, sub_dim), got shape {tuple(centroids.shape)}")
    B, K, d = centroids.shape
    if codes.dim() != 2 or codes.shape[1] != B:
        raise ValueError(f"codes must be (vocab, num_basis={B}), got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    codes = codes.to(device=centroids.device, dtype=torch.long)  # uint8/int16 cannot index
    sub = torch.arange(B, device=centroids.device)
    return centroids[sub[None, :], codes].reshape(codes.shape[0], B * d)  # (V, B, d) -> (V, D)


def encode(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Codes of new rows under a fixed codebook, the inverse of `reconstruct`: each sub-vector's nearest centroid.

    rows: (n, D) floating; centroids: (B, K, d) with B * d = D. Returns (n, B) codes in `code_dtype(K)` on the
    centroids' device (computed in float32).
    """
    B, K, d = centroids.shape
    if rows.dim() != 2 or rows.shape[1] != B * d:
        raise ValueError(
            f"rows must be (n, {B * d}) to be encoded with a ({B}, {K}, {d}) codebook, got {tuple(rows.shape)}"
        )
    device = centroids.device
    with torch.no_grad(), _ieee_fp32_matmul(device):
        X = rows.detach().to(device, torch.float32).reshape(-1, B, d).permute(1, 0, 2).contiguous()  # (B, n, d)
        codes, _ = _assign(X, centroids.detach().float())  # (B, n)
    return codes.t().to(code_dtype(K)).contiguous()  # (n, B)


def product_quantize(
    weight: torch.Tensor,
    num_basis: int,
    num_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = 25,
    tol: float = 1e-4,
    sample_weight: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PQResult:
    """Product-quantize a (V, D) matrix: k-means with `num_clusters` centroids in each of `num_basis` sub-spaces.

    Args:
        weight: (V, D) floating tensor (fp32/fp16/bf16/fp64); read only, never modified. Work is done on its device
            in float32, or float64 for a float64 weight.
        num_basis: number of sub-spaces B; must divide D (sub-vector width d = D // B).
        num_clusters: centroids K per sub-space, in [2, 32768]. May exceed V (surplus centroids copy existing rows).
        seed: seeds a torch.Generator on the weight's device: the same seed on the same device and input gives
            identical codes and centroids.
        max_iter: maximum number of Lloyd iterations (>= 0).
        tol: stop once the k-means objective decreases by less than this fraction in one iteration (>= 0).
        sample_weight: optional (V,) non-negative finite weights, not all zero (a tensor or anything
            `torch.as_tensor` takes; integer counts are fine): weighted k-means, see the module docstring. Only ratios
            matter (the weights are rescaled to a maximum of 1). Rows of weight 0 still get codes but do not pull
            any centroid. Constant weights are the unweighted problem and give exactly the unweighted result.
            None (default): every row weighs the same.
        progress: optional callback, called after each Lloyd iteration with (iterations done, expected total): the
            total is max_iter until the iterations converge, then the number done (for a progress bar).

    Returns:
        PQResult with codes (V, B) in `code_dtype(K)`, centroids (B, K, d) float32 (float64 for a float64 weight) and
        the relative Frobenius error.
        `relative_error` is always the unweighted ||W - W_q||_F / ||W||_F, whatever `sample_weight`, so errors of
        weighted and unweighted runs compare directly.
    """
    V, D, B, K = _check_args(weight, num_basis, num_clusters, max_iter, tol)
    d = D // B
    device = weight.device
    weights = _check_sample_weight(sample_weight, V, device)  # (V,) float32 in [0, 1], or None
    with torch.no_grad(), _ieee_fp32_matmul(device):
        # (V, D) -> (V, B, d) -> (B, V, d): each sub-space's sub-vectors contiguous, so per-sub-space matmuls are bmm.
        X = weight.detach().to(_work_dtype(weight.dtype)).reshape(V, B, d).permute(1, 0, 2).contiguous()  # (B, V, d)

        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

        # k-means++ on a random subsample of rows (see _INIT_ROWS_PER_CLUSTER).
        num_init_rows = min(V, _INIT_ROWS_PER_CLUSTER * K)
        if num_init_rows == V:
            X_init, w_init = X, weights
        elif weights is None:
            X_init, w_init = X[:, torch.randperm(V, generator=generator, device=device)[:num_init_rows]], None
        else:
            rows, w_init = _weighted_draws(weights, num_init_rows, generator)  # (S',), (S',) with S' <= S
            X_init = X[:, rows]  # (B, S', d)
        centroids = _kmeans_pp_init(X_init, K, generator, w_init)  # (B, K, d)
        del X_init, w_init

        centroids, assign, _, iterations = _lloyd(X, centroids, max_iter, tol, weights, progress)  # (B,K,d), (B,V)

        relative_error = _relative_error(X, centroids, assign)
        codes = assign.t().to(code_dtype(K)).contiguous()  # (V, B)
    return PQResult(codes=codes, centroids=centroids, relative_error=relative_error, iterations=iterations)


# --------------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------------


def _check_args(weight: torch.Tensor, num_basis: int, num_clusters: int, max_iter: int, tol: float) -> tuple[int, ...]:
    """Validate product_quantize's arguments; return (V, D, B, K)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (vocab, hidden) matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(
            f"weight must be a floating-point tensor (float32, float16, bfloat16, float64), got {weight.dtype}"
        )
    V, D = weight.shape
    if V < 1 or D < 1:
        raise ValueError(f"weight must have at least one row and one column, got shape {tuple(weight.shape)}")
    B = _as_int("num_basis", num_basis)
    K = _as_int("num_clusters", num_clusters)
    if B < 1:
        raise ValueError(
            f"num_basis must be a positive integer dividing the hidden size {D} (one of {divisors(D)}), got {B}"
        )
    if D % B != 0:
        raise ValueError(
            f"num_basis={B} does not divide the hidden size {D}; num_basis must be one of its divisors: {divisors(D)}"
        )
    if not 2 <= K <= MAX_CLUSTERS:
        raise ValueError(f"num_clusters must be an integer in [2, {MAX_CLUSTERS}], got {K}")
    if _as_int("max_iter", max_iter) < 0:
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter}")
    if not tol >= 0:  # also rejects NaN
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or infinite values; k-means needs finite values")
    return V, D, B, K


def _check_sample_weight(sample_weight: object, V: int, device: torch.device) -> torch.Tensor | None:
    """Validate `sample_weight`; return it as (V,) float32 on `device` scaled to a maximum of 1, or None.

    None is returned for None and for constant weights: both are the unweighted problem, and taking the unweighted
    code path makes the result bit-identical to it (weighted sums round differently from plain ones).
    """
    if sample_weight is None:
        return None
    w = as_row_weights(sample_weight, "sample_weight")
    if w.shape != (V,):
        raise ValueError(f"sample_weight must have shape ({V},) (one weight per row of weight), got {tuple(w.shape)}")
    # The max-1 scaling keeps weight * D^2 far from float32 overflow.
    w = w.to(device)
    w_max = float(w.max())
    if float(w.min()) == w_max:
        return None
    return (w / w_max).to(torch.float32)


def _as_int(name: str, value: object) -> int:
    """Accept Python / numpy integers (not bools, not floats)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Run CUDA fp32 matmuls in full precision for the duration.

    With TF32 enabled (a common global setting for training) the distance matmuls and the one-hot centroid sums
    would round X to a 10-bit mantissa, giving visibly worse centroids. Restored on exit.
    """
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


# --------------------------------------------------------------------------------------------------------------------
# k-means pieces (all batched over the B sub-spaces)
# --------------------------------------------------------------------------------------------------------------------


def _chunk_rows(B: int, K: int) -> int:
    """Rows per chunk so that a (B, chunk, K) fp32 block is at most _CHUNK_BYTES."""
    return max(1, _CHUNK_BYTES // (B * K * 4))


def _weighted_draws(
    weights: torch.Tensor, num_draws: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `num_draws` rows with replacement, proportional to weights (V,) >= 0 (not all 0).

    Returns the distinct rows drawn (S',) and how many times each was drawn (S',) float32: k-means++ weighted by
    those counts on those rows samples the weighted distribution of all V rows. Rows of weight 0 are never drawn.
    """
    cum = weights.double().cumsum(0)  # (V,); float64 so that light rows keep their share of a long sum
    u = torch.rand(num_draws, generator=generator, device=weights.device, dtype=torch.float64) * cum[-1]
    draws = torch.searchsorted(cum, u, right=True).clamp_(max=weights.shape[0] - 1)  # first row with cum > u
    rows, counts = torch.unique(draws, return_counts=True)
    return rows, counts.to(torch.float32)


def _kmeans_pp_init(
    X: torch.Tensor, K: int, generator: torch.Generator, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Batched k-means++ seeding: X (B, S, d) fp32 -> centroids (B, K, d), all chosen among X's rows.

    weights: optional (S,) non-negative row weights. Then the first centroid is drawn proportional to weight and
    every later one proportional to weight * D^2, so a row of weight 0 is drawn only by the uniform fallback below
    (when all the remaining weighted mass is 0). None: the classic draws (first one uniform), unchanged.

    Each new centroid is drawn with probability proportional to the squared distance to the nearest centroid already
    chosen (per sub-space). When every remaining point coincides with a chosen centroid (total weight 0: fewer
    distinct rows than K, duplicate rows) the draw is uniform, so the surplus centroids are copies of existing rows
    instead of a division by zero. Distances here are computed as ||x - c||^2 directly (not the matmul trick) so
    coinciding points give exactly 0 and are never drawn while a distinct row is left.
    """
    B, S, d = X.shape
    device = X.device
    sub = torch.arange(B, device=device)  # (B,)
    centroids = X.new_empty(B, K, d)  # (B, K, d)
    uniform_cum = torch.arange(1, S + 1, device=device, dtype=X.dtype).expand(B, S)  # (B, S)

    def draw(mass: torch.Tensor) -> torch.Tensor:
        """One row per sub-space drawn proportional to mass (B, S) >= 0 -> (B,) indices."""
        cum = mass.cumsum(1)  # (B, S)
        # Degenerate sub-spaces (all points already chosen, or all remaining mass on weight-0 rows) fall back to a
        # uniform draw; torch.where keeps this branch-free so there is no host sync per step on CUDA.
        degenerate = cum[:, -1:] <= 0  # (B, 1)
        cum = torch.where(degenerate, uniform_cum, cum)
        u = torch.rand(B, 1, generator=generator, device=device) * cum[:, -1:]  # (B, 1), in [0, total)
        # First index whose cumulative mass exceeds u: a zero-mass point (already a centroid, or weight 0) is never
        # picked.
        return torch.searchsorted(cum, u, right=True).clamp_(max=S - 1).squeeze(1)  # (B,)

    if weights is None:
        first = torch.randint(S, (B,), generator=generator, device=device)  # (B,)
    else:
        first = draw(weights.expand(B, S))  # (B,)
    centroids[:, 0] = X[sub, first]
    min_d2 = (X - centroids[:, :1]).square_().sum(-1)  # (B, S): squared distance to the nearest chosen centroid
    for k in range(1, K):
        pick = draw(min_d2 if weights is None else min_d2 * weights)  # (B,)
        new = X[sub, pick]  # (B, d)
        centroids[:, k] = new
        torch.minimum(min_d2, (X - new[:, None]).square_().sum(-1), out=min_d2)
    return centroids


def _assign(X: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid per sub-vector: X (B, V, d), centroids (B, K, d) -> codes (B, V) int64, sq. dist (B, V).

    argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k), one baddbmm per chunk of rows; ||x||^2 is added only to
    the minimum. Ties go to the lowest centroid index. Distances are clamped at 0 (cancellation can make them
    slightly negative).
    """
    B, V, _ = X.shape
    K = centroids.shape[1]
    c_sq = centroids.square().sum(-1).unsqueeze(1)  # (B, 1, K)
    c_t = centroids.transpose(1, 2)  # (B, d, K)
    codes = torch.empty(B, V, dtype=torch.long, device=X.device)  # (B, V)
    min_dist = torch.empty(B, V, dtype=X.dtype, device=X.device)  # (B, V)
    chunk = _chunk_rows(B, K)
    for start in range(0, V, chunk):
        x = X[:, start : start + chunk]  # (B, n, d)
        scores = torch.baddbmm(c_sq, x, c_t, alpha=-2.0)  # (B, n, K) = ||c||^2 - 2 x.c
        best, idx = scores.min(dim=-1)  # (B, n)
        codes[:, start : start + chunk] = idx
        min_dist[:, start : start + chunk] = (best + x.square().sum(-1)).clamp_(min=0)
    return codes, min_dist


def _cluster_sums(
    X: torch.Tensor, codes: torch.Tensor, K: int, use_one_hot: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts: X (B, V, d), codes (B, V) -> sums (B, K, d) fp32, counts (B, K) int64.

    use_one_hot: None picks index_add_ on CPU and the one-hot bmm elsewhere (see below); tests force either path.
    Weighted k-means passes `_weighted_points(X, weights)` (B, V, d + 1) as X: the sums are then the weighted sums
    with the total weight of each cluster in the last column, on the same deterministic paths.
    """
    B, V, d = X.shape
    flat = (codes + torch.arange(B, device=X.device).unsqueeze(1) * K).reshape(-1)  # (B*V,) ids into B*K clusters
    counts = torch.bincount(flat, minlength=B * K).view(B, K)  # (B, K)
    if use_one_hot is None:
        use_one_hot = X.device.type != "cpu"
    if not use_one_hot:
        # index_add_ is deterministic on CPU and does no extra flops.
        sums = X.new_zeros(B * K, d).index_add_(0, flat, X.reshape(B * V, d)).view(B, K, d)
    else:
        # On GPUs index_add_ uses float atomics (run-to-run different rounding, so seeds would not reproduce
        # bit-exactly); a one-hot bmm per chunk is deterministic and cheap there.
        sums = X.new_zeros(B, K, d)
        chunk = _chunk_rows(B, K)
        for start in range(0, V, chunk):
            c = codes[:, start : start + chunk]  # (B, n)
            one_hot = X.new_zeros(B, c.shape[1], K).scatter_(2, c.unsqueeze(2), 1.0)  # (B, n, K)
            sums.baddbmm_(one_hot.transpose(1, 2), X[:, start : start + chunk])  # += (B, K, n) @ (B, n, d)
    return sums, counts


def _weighted_points(X: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """X (B, V, d), weights (V,) -> (B, V, d + 1): each point times its weight, then the weight itself.

    Summing these rows per cluster (`_cluster_sums`, either path) gives the weighted sums and the total weight of
    every cluster in one pass, with the same deterministic reduction as the unweighted sums. Built once per run:
    the weights do not change between iterations.
    """
    B, V, _ = X.shape
    w = weights.view(1, V, 1).expand(B, V, 1)  # (B, V, 1)
    return torch.cat([X * w, w], dim=2)  # (B, V, d + 1)


def _update(
    X: torch.Tensor,
    codes: torch.Tensor,
    min_dist: torch.Tensor,
    K: int,
    weights: torch.Tensor | None = None,
    weighted_X: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """One centroid update: means of the assigned points; empty clusters are re-seeded.

    X (B, V, d), codes (B, V), min_dist (B, V) = squared distance of each point to its current centroid.
    weights: optional (V,) row weights, with weighted_X = _weighted_points(X, weights) (B, V, d + 1). Then the
    centroids are weighted means and a cluster is empty when its points weigh 0 in total (no points, or only
    weight-0 ones: its weighted mean would be 0 / 0).
    Returns new centroids (B, K, d) and the number of empty clusters re-seeded (summed over sub-spaces).

    The i-th empty cluster of sub-space b (in centroid order) takes the i-th farthest point of sub-space b (by
    weight * squared distance when weighted), so the points worst served by the current codebook get their own
    centroid. That can only lower the objective. When a sub-space has more empty clusters than points (V < K) the
    farthest points are reused: copies, never NaN.
    """
    B, V, d = X.shape
    if weights is None:
        sums, counts = _cluster_sums(X, codes, K)  # (B, K, d), (B, K)
        centroids = sums / counts.clamp(min=1).unsqueeze(2).to(sums.dtype)  # (B, K, d)
        empty = counts == 0  # (B, K)
        cost = min_dist  # (B, V): what each point adds to the objective
    else:
        assert weighted_X is not None
        sums_w, _ = _cluster_sums(weighted_X, codes, K)  # (B, K, d + 1)
        sums, total = sums_w[..., :d], sums_w[..., d]  # (B, K, d), (B, K) total weight per cluster
        empty = total <= 0  # (B, K)
        centroids = sums / torch.where(empty, 1.0, total).unsqueeze(2)  # (B, K, d)
        cost = min_dist * weights  # (B, V)
    num_empty = int(empty.sum())
    if num_empty:
        take = min(int(empty.sum(1).max()), V)
        farthest = cost.topk(take, dim=1).indices  # (B, take), farthest first
        rank = (empty.long().cumsum(1) - 1).clamp_(min=0) % take  # (B, K): i for the i-th empty cluster
        src = farthest.gather(1, rank)  # (B, K) row feeding each cluster (used only where empty)
        seeds = X.gather(1, src.unsqueeze(2).expand(B, K, d))  # (B, K, d)
        centroids = torch.where(empty.unsqueeze(2), seeds, centroids)
    return centroids, num_empty


def _lloyd(
    X: torch.Tensor, centroids: torch.Tensor, max_iter: int, tol: float, weights: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Lloyd's iterations from the given centroids.

    X (B, V, d), centroids (B, K, d), weights optional (V,) ->
    (centroids (B, K, d), codes (B, V), min_dist (B, V), iterations).
    The returned codes are the assignment to the returned centroids (nearest centroid: weights do not change which
    centroid is nearest). Stops when the objective (total squared distance, weighted by `weights` when given,
    summed over sub-spaces) decreases by less than `tol` relative to the previous one, or after max_iter.
    """
    K = centroids.shape[1]
    weighted_X = None if weights is None else _weighted_points(X, weights)  # (B, V, d + 1)

    def total(min_dist: torch.Tensor) -> float:
        if weights is None:
            return float(min_dist.sum(dtype=torch.float64))
        return float((min_dist.double() * weights.double()).sum())

    codes, min_dist = _assign(X, centroids)
    objective = total(min_dist)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        centroids, _ = _update(X, codes, min_dist, K, weights, weighted_X)
        codes, min_dist = _assign(X, centroids)
        new_objective = total(min_dist)
        converged = objective - new_objective <= tol * objective  # also true once objective is 0
        objective = new_objective
        if progress is not None:
            progress(iterations, iterations if converged else max_iter)
        if converged:
            break
    return centroids, codes, min_dist, iterations


def relative_error(weight: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor) -> float:
    """||W - reconstruct(codes, centroids)||_F / ||W||_F for weight (V, D), codes (V, B), centroids (B, K, D/B)."""
    V, D = weight.shape
    B, _, d = centroids.shape
    dtype = _work_dtype(weight.dtype)
    X = weight.detach().to(device=centroids.device, dtype=dtype).reshape(V, B, d).permute(1, 0, 2)
    return _relative_error(X, centroids.to(dtype), codes.to(centroids.device).long().t())


def _relative_error(X: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor) -> float:
    """||X - decode||_F / ||X||_F computed directly (no matmul-trick cancellation), chunked over V; 0.0 if X == 0."""
    B, V, d = X.shape
    err = torch.zeros((), dtype=torch.float64, device=X.device)
    norm = torch.zeros((), dtype=torch.float64, device=X.device)
    chunk = _chunk_rows(B, d)  # a (B, chunk, d) fp32 block at most _CHUNK_BYTES
    for start in range(0, V, chunk):
        x = X[:, start : start + chunk]  # (B, n, d)
        c = codes[:, start : start + chunk]  # (B, n)
        decoded = centroids.gather(1, c.unsqueeze(2).expand(-1, -1, d))  # (B, n, d)
        err += (x - decoded).square_().sum(dtype=torch.float64)
        norm += x.square().sum(dtype=torch.float64)
    norm_value = float(norm)
    return 0.0 if norm_value == 0.0 else float(err.sqrt()) / norm_value**0.5
