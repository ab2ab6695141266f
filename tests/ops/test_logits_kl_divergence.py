"""logits_kl_divergence against the KL written out with softmaxes: value, gradient, mask, reductions, errors."""

import pytest
import torch

from hf_basis.ops.logits_kl_divergence import logits_kl_divergence


def test_matches_the_kl_written_out():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(2, 5, 11, generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    tau = 1.7
    p, q = torch.softmax(teacher / tau, -1), torch.softmax(logits / tau, -1)
    per_position = tau**2 * (p * (p / q).log()).sum(-1)
    reference = per_position[mask].sum()

    total = logits_kl_divergence(logits, teacher, mask, tau, reduction="sum")
    torch.testing.assert_close(total, reference)
    mean = logits_kl_divergence(logits, teacher, mask, tau)
    torch.testing.assert_close(mean, reference / mask.sum())
    (grad,) = torch.autograd.grad(mean, logits)
    (reference_grad,) = torch.autograd.grad(reference / mask.sum(), logits)
    torch.testing.assert_close(grad, reference_grad)
    # No mask: every position; none counted: 0.
    torch.testing.assert_close(logits_kl_divergence(logits, teacher, temperature=tau), per_position.mean())
    assert logits_kl_divergence(logits, teacher, torch.zeros(2, 5, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"reduction": "none"}, "reduction must be one of"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"mask": torch.ones(3, dtype=torch.bool)}, "mask must have"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        logits_kl_divergence(torch.zeros(2, 4), torch.zeros(2, 4), **kwargs)
    with pytest.raises(ValueError, match="teacher_logits must have"):
        logits_kl_divergence(torch.zeros(2, 4), torch.zeros(2, 5))
