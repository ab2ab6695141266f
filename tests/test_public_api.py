"""The public names the README documents are what it says they are (issue 15, item 18)."""

import importlib

import torch
import torch.nn.functional as F

import hf_basis
import hf_basis.ops
from hf_basis.compress.pq import reconstruct


def test_basis_cross_entropy_is_callable_where_the_readme_says():
    torch.manual_seed(0)
    B, K, d, V, T = 2, 5, 3, 11, 7
    hidden = torch.randn(T, B * d)
    centroids = torch.randn(B, K, d)
    codes = torch.randint(0, K, (V, B))
    bias = torch.randn(V)
    labels = torch.randint(0, V, (T,))
    # Independent reference: the dense weight's logits and PyTorch's cross-entropy.
    expected = F.cross_entropy(hidden @ reconstruct(codes, centroids).t() + bias, labels)
    for fn in (hf_basis.ops.basis_cross_entropy, hf_basis.basis_cross_entropy):
        torch.testing.assert_close(fn(hidden, centroids, codes, bias, labels), expected)
    assert hf_basis.basis_cross_entropy is hf_basis.ops.basis_cross_entropy
    # The module stays reachable by its import path.
    module = importlib.import_module("hf_basis.ops.basis_cross_entropy")
    assert module.basis_cross_entropy is hf_basis.basis_cross_entropy
