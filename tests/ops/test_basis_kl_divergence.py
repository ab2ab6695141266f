"""Fused basis KL divergence against F.kl_div on dense logits built from the decoded weight (float64 reference)."""

import pytest
import torch
import torch.nn.functional as F

from hf_basis.compress.pq import reconstruct
from hf_basis.ops.basis_kl_divergence import basis_kl_divergence

from kernel_device import DEVICE, require_device

require_device()


def _problem(T=29, V=47, B=3, K=5, d=4, Ht=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, B * d, generator=g).to(DEVICE)
    C = torch.randn(B, K, d, generator=g).to(DEVICE)
    codes = torch.randint(0, K, (V, B), generator=g).to(DEVICE, torch.uint8)
    bias = torch.randn(V, generator=g).to(DEVICE)
    th = torch.randn(T, Ht, generator=g).to(DEVICE)
    tw = torch.randn(V, Ht, generator=g).to(DEVICE)
    tb = torch.randn(V, generator=g).to(DEVICE)
    mask = torch.rand(T, generator=g).to(DEVICE) > 0.3
    return h, C, codes, bias, th, tw, tb, mask


def _dense_kl(h, C, codes, bias, th, tw, tb, mask, tau, reduction):
    """tau^2 * KL(p_teacher || q_student) per token from nn.Linear-style dense logits (W decoded as an nn.Linear
    weight), by F.kl_div, in float64."""
    W = reconstruct(codes, C.double())
    s = F.linear(h.double(), W, None if bias is None else bias.double())
    z = F.linear(th.double(), tw.double(), tb.double())
    kl = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(z / tau, -1), log_target=True, reduction="none").sum(-1)
    total = (kl * mask).sum() * tau**2
    return total / mask.sum() if reduction == "mean" else total


@pytest.mark.parametrize("tau, reduction, with_bias, chunk", [(1.0, "mean", True, None), (2.0, "sum", False, 4),
                                                              (0.5, "mean", True, 7)])
def test_kl_matches_dense_reference_values_and_gradients(tau, reduction, with_bias, chunk):
    h, C, codes, bias, th, tw, tb, mask = _problem()
    bias = bias if with_bias else None
    leaves = [t.clone().requires_grad_() for t in (h, C) + ((bias,) if with_bias else ())]
    hl, Cl = leaves[:2]
    bl = leaves[2] if with_bias else None
    loss = basis_kl_divergence(hl, Cl, codes, bl, th, tw, tb, mask, tau, reduction, chunk_tokens=chunk)
    (2.5 * loss).backward()

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rh, rC = ref_leaves[:2]
    rb = ref_leaves[2] if with_bias else None
    ref = _dense_kl(rh, rC, codes, rb, th, tw, tb, mask, tau, reduction)
    (2.5 * ref).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-4, atol=1e-5)


def test_kl_is_zero_for_a_student_equal_to_its_teacher_and_teacher_gets_no_gradient():
    h, C, codes, bias, _, _, _, mask = _problem()
    W = reconstruct(codes, C)  # the teacher is the decoded student: same logits
    tw = W.clone().requires_grad_()
    hl = h.clone().requires_grad_()
    loss = basis_kl_divergence(hl, C, codes, bias, h, tw, bias, mask, 1.0)
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert hl.grad.abs().max() < 1e-5
    assert tw.grad is None


def test_kl_chunking_does_not_change_the_result():
    h, C, codes, bias, th, tw, tb, mask = _problem(T=31)
    a = basis_kl_divergence(h, C, codes, bias, th, tw, tb, mask, 1.5, chunk_tokens=1)
    b = basis_kl_divergence(h, C, codes, bias, th, tw, tb, mask, 1.5, chunk_tokens=1000)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [({"temperature": 0.0}, "temperature"), ({"reduction": "none"}, "reduction"),
                                           ({"mask": torch.ones(3, dtype=torch.bool)}, "mask")])
def test_kl_rejects_bad_arguments(kwargs, match):
    h, C, codes, bias, th, tw, tb, mask = _problem()
    args = {"mask": mask, **kwargs}
    with pytest.raises(ValueError, match=match):
        basis_kl_divergence(h, C, codes, bias, th, tw, tb, **args)
