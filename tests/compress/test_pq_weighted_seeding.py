"""Frequency-weighted k-means seeds its heavy rows whatever the vocabulary size (issue 15, item 4).

8 rows carry nearly all the weight and there are 8 clusters: weighted k-means must give each its own centroid (error
~ the light rows' pull, 1e-5). Seeding from a uniform subsample of 20 x K rows left most of them out once V > 160.
"""

import pytest
import torch

from hf_basis.compress.pq import product_quantize


def decode_by_hand(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    B = centroids.shape[0]
    return torch.stack([torch.cat([centroids[b, int(row[b])] for b in range(B)]) for row in codes])


@pytest.mark.parametrize("V", [150, 300, 2000])
@pytest.mark.parametrize("seed", [0, 1])
def test_dominant_rows_are_seeded(V, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, 16, generator=g)
    heavy = torch.randperm(V, generator=g)[:8]
    frequencies = torch.ones(V)
    frequencies[heavy] = 1e6
    result = product_quantize(W, 2, 8, seed=seed, sample_weight=frequencies)
    decoded = decode_by_hand(result.codes[heavy], result.centroids)
    error = float((decoded - W[heavy]).norm() / W[heavy].norm())
    assert error < 1e-3, error

