"""The hf_basis custom ops pass torch.library.opcheck: schema, autograd registration, fake (meta) implementation
matching the real one, and AOT dispatch with dynamic shapes. This is what torch.compile / torch.export rely on."""

import pytest
import torch

import hf_basis.ops.basis_cross_entropy  # noqa: F401  (importing registers the ops)
import hf_basis.ops.quant_lookup  # noqa: F401
from hf_basis.compress.packing import pack_bits

ops = torch.ops.hf_basis


def _basis(seed=0, T=5, V=23, B=2, K=4, d=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, B * d, generator=g, dtype=dtype, requires_grad=True)
    centroids = torch.randn(B, K, d, generator=g, dtype=dtype, requires_grad=True)
    codes = torch.randint(0, K, (V, B), generator=g)
    bias = torch.randn(V, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[0] = -100
    return hidden, centroids, codes, bias, labels


@pytest.mark.parametrize("with_bias", [True, False])
def test_decode_and_projection_ops(with_bias):
    hidden, centroids, codes, bias, _ = _basis()
    P = torch.randn(2, 4, 5, requires_grad=True)
    torch.library.opcheck(ops.basis_decode, (P, codes, bias if with_bias else None))
    torch.library.opcheck(ops.centroid_scores, (hidden, centroids))
    torch.library.opcheck(ops.basis_linear, (hidden, centroids, codes, bias if with_bias else None))
    torch.library.opcheck(ops.basis_linear, (hidden.detach().view(1, 5, 6).requires_grad_(), centroids, codes, None))
    grad = torch.randn(5, 23)
    torch.library.opcheck(ops.basis_decode_backward, (grad, codes, 4, with_bias, torch.float32, torch.float32))
    torch.library.opcheck(ops.centroid_scores_backward, (P.detach(), hidden.detach(), centroids.detach(), True,
                                                         with_bias))


@pytest.mark.parametrize("reduction,grads_in_forward", [("mean", True), ("sum", False), ("none", False)])
def test_cross_entropy_op(reduction, grads_in_forward):
    hidden, centroids, codes, bias, labels = _basis()
    args = (hidden, centroids, codes, bias, labels, -100, reduction, 0.1, 1e-3, None, "torch", None, True, True, True,
            grads_in_forward)
    torch.library.opcheck(ops.basis_cross_entropy, args)


def test_quant_lookup_op():
    g = torch.Generator().manual_seed(0)
    fields = torch.randint(0, 16, (11, 6), generator=g, dtype=torch.uint8)
    packed = pack_bits(fields, 4)
    levels = torch.linspace(-1, 1, 16)
    ids = torch.randint(0, 11, (2, 3), generator=g)
    torch.library.opcheck(ops.quant_lookup, (packed, levels, ids, 4, 6, torch.bfloat16))
