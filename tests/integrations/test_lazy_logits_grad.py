"""Extra loss terms on `outputs.logits` of a converted model get their gradients, whatever read the logits first,
and DDP's output handling does not build them (issue 15, item 2).

Reference: the same model with dense nn.Embedding / nn.Linear layers holding the decoded weights (no LazyLogits, no
fused loss); its weight gradients are summed per centroid through the codes to compare with the centroids'.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import hf_basis
import hf_basis.modules.lazy_logits as lazy_logits
from hf_basis.modules.lazy_logits import LazyLogits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import tiny_model  # noqa: E402

V = 64


def models():
    """(converted, dense reference with the converted layers' decoded weights), both in train mode."""
    dense = tiny_model("llama", vocab_size=V, tie=False)
    converted = hf_basis.convert(copy.deepcopy(dense), num_basis=4, num_clusters=16)
    with torch.no_grad():
        dense.get_input_embeddings().weight.copy_(converted.get_input_embeddings().weight)
        dense.get_output_embeddings().weight.copy_(converted.get_output_embeddings().weight)
    return converted.train(), dense.train()


def centroid_grad(dense_grad: torch.Tensor, codes: torch.Tensor, K: int) -> torch.Tensor:
    """d/d centroids[b, k] = sum of the dense row gradients over the words whose b-th code is k."""
    V, B = codes.shape
    d = dense_grad.shape[1] // B
    out = torch.zeros(B, K, d, dtype=dense_grad.dtype)
    for b in range(B):
        out[b].index_add_(0, codes[:, b].long(), dense_grad[:, b * d:(b + 1) * d])
    return out


def z_loss_objective(model, ids):
    out = model(input_ids=ids, labels=ids)
    with torch.no_grad():  # a metric read first, e.g. token accuracy
        accuracy = (out.logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean()
    return out, accuracy, out.loss + 0.01 * out.logits.logsumexp(-1).pow(2).mean()


def assert_same_gradients(converted, dense):
    dense_params = dict(dense.named_parameters())
    for name, param in converted.named_parameters():
        if "codebook" in name:
            continue
        torch.testing.assert_close(param.grad, dense_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    for layer, dense_layer in ((converted.get_input_embeddings(), dense.get_input_embeddings()),
                               (converted.get_output_embeddings(), dense.get_output_embeddings())):
        book = layer.codebook
        expected = centroid_grad(dense_layer.weight.grad, book.codes, book.num_clusters)
        torch.testing.assert_close(book.centroids.grad, expected, rtol=1e-4, atol=1e-6)


def test_extra_term_after_a_no_grad_read_gets_its_gradient():
    converted, dense = models()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    out, accuracy, objective = z_loss_objective(converted, ids)
    assert isinstance(out.logits, LazyLogits)  # the fused path is what is tested
    ref_out, ref_accuracy, ref_objective = z_loss_objective(dense, ids)
    assert accuracy == ref_accuracy
    torch.testing.assert_close(objective, ref_objective, rtol=1e-5, atol=1e-5)
    objective.backward()
    ref_objective.backward()
    assert_same_gradients(converted, dense)


@pytest.fixture
def gloo_group():
    """A one-process gloo group: DDP runs its real output handling (the part at stake) without spawning workers."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_find_unused_parameters_does_not_build_the_logits(gloo_group, monkeypatch):
    converted, dense = models()
    ddp = torch.nn.parallel.DistributedDataParallel(converted, find_unused_parameters=True)  # the Trainer's default
    built = []
    original = lazy_logits.basis_linear
    monkeypatch.setattr(lazy_logits, "basis_linear", lambda *a: (built.append(torch.is_grad_enabled()),
                                                                 original(*a))[1])
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    out = ddp(input_ids=ids, labels=ids)
    assert isinstance(out.logits, LazyLogits) and built == []  # the fused loss saved the T x V logits
    with torch.no_grad():
        out.logits.argmax(-1)
    objective = out.loss + 0.01 * out.logits.logsumexp(-1).pow(2).mean()
    assert built == [False, True]  # the no-grad read, then the read that needs a graph
    objective.backward()
    _, _, ref_objective = z_loss_objective(dense, ids)
    ref_objective.backward()
    torch.testing.assert_close(objective, ref_objective, rtol=1e-5, atol=1e-5)
    assert_same_gradients(converted, dense)


def test_register_hook_waits_for_the_logits_and_fires_on_their_gradient(monkeypatch):
    """FSDP2 hooks every output of a sharded module (and reads `_base`): that must not build the logits, and a hook
    must still see the logits' gradient when they are built and differentiated."""
    converted, _ = models()
    ids = torch.randint(0, V, (2, 6))
    out = converted(input_ids=ids, labels=ids)
    assert isinstance(out.logits, LazyLogits)
    built = []
    compute = lazy_logits.basis_linear
    monkeypatch.setattr(lazy_logits, "basis_linear", lambda *a: built.append(1) or compute(*a))
    seen, dropped = [], []
    assert out.logits._base is None
    out.logits.register_hook(lambda g: seen.append(g.clone()))
    out.logits.register_hook(lambda g: dropped.append(g)).remove()
    out.loss.backward(retain_graph=True)  # the fused loss alone: no logits, no gradient through them
    assert built == [] and seen == []
    logits = out.logits.float()  # a derived lazy tensor keeps the hooks of the logits it stands for
    (logits * 3.0).sum().backward()
    assert built == [1] and len(seen) == 1 and dropped == []
    torch.testing.assert_close(seen[0], torch.full((2, 6, V), 3.0))
