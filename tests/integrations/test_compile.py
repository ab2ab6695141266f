"""torch.compile(fullgraph=True) and torch.export through converted models: the hf_basis custom ops stay whole in
the graph (no graph break), and compiled / exported results (forward, fused-loss training step, static-cache
generation) match eager ones.

CPU, tiny models, backend "aot_eager" (one small "inductor" test). Before the ops were custom ops a tiny converted
Llama broke the graph 8 times in a forward with grad and 7 times in a training step with labels.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import hf_basis
from hf_basis.integrations.fused_loss import uninstall_fused_loss
from hf_basis.ops.basis_cross_entropy import basis_cross_entropy
from hf_basis.ops.basis_linear import basis_linear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import tiny_model  # noqa: E402

V = 300


def _model(arch, method="basis"):
    torch.manual_seed(0)
    model = tiny_model(arch, vocab_size=V, hidden=32)
    if method == "basis":
        hf_basis.convert(model, num_basis=4, num_clusters=16, modules="both")
    else:
        hf_basis.convert(model, method="quant")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _ids(seed=0):
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(seed))


def _compile(model):
    """torch.compile(fullgraph=True) on aot_eager, recording the hf_basis ops of every graph dynamo hands over."""
    torch._dynamo.reset()
    counters.clear()
    ops = set()
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        ops.update(str(n.target) for n in gm.graph.nodes if "hf_basis" in str(n.target))
        return aot_eager(gm, example_inputs)

    return torch.compile(model, backend=backend, fullgraph=True), ops


def _graph_breaks():
    return sum(counters["graph_break"].values())


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_forward_with_grad_matches_eager(arch):
    model = _model(arch).eval()
    ref_model = copy.deepcopy(model)
    compiled, ops = _compile(model)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, ref_model(input_ids=ids).logits)
    logits = compiled(input_ids=ids).logits
    (logits.float() ** 2).mean().backward()  # the basis head's backward: the decode's and the projection's ops
    ref = ref_model(input_ids=ids).logits
    (ref.float() ** 2).mean().backward()
    torch.testing.assert_close(logits, ref)
    g, g_ref = _grads(model), _grads(ref_model)
    assert g.keys() == g_ref.keys() and any("centroids" in n for n in g)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert _graph_breaks() == 0
    assert "hf_basis.basis_linear.default" in ops


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_training_step_uses_fused_loss(arch):
    model = _model(arch).train()
    plain = copy.deepcopy(model)
    uninstall_fused_loss(plain)  # eager reference: real logits and transformers' ForCausalLMLoss
    compiled, ops = _compile(model)
    ids = _ids()
    labels = ids.clone()
    labels[0, :3] = -100
    for step in range(2):  # the second call reuses the compiled graph
        for m in (model, plain):
            m.zero_grad()
        out = compiled(input_ids=ids, labels=labels)
        out.loss.backward()
        ref = plain(input_ids=ids, labels=labels)
        ref.loss.backward()
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logits, ref.logits)  # the compiled head's logits are the real ones
        g, g_ref = _grads(model), _grads(plain)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert _graph_breaks() == 0
    assert "hf_basis.basis_cross_entropy.default" in ops  # the loss went through the fused op


def test_compiled_loss_only_never_decodes_the_logits(monkeypatch):
    """Compiling a function that returns only the loss lets the compiler drop the head's logits: the decode op never
    runs (the fused loss works from the hidden states)."""
    from hf_basis.ops import basis_decode as decode_module

    calls = []
    reference = decode_module.basis_decode_reference
    monkeypatch.setattr(decode_module, "basis_decode_reference", lambda *args: calls.append(1) or reference(*args))
    model = _model("llama").train()
    ids = _ids()
    model(input_ids=ids)  # no labels: real logits, through the decode op
    assert calls
    calls.clear()
    torch._dynamo.reset()
    step = torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss, backend="aot_eager", fullgraph=True)
    step(ids).backward()
    assert not calls and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_compiled_quant_forward():
    model = _model("llama", method="quant").eval()
    compiled, ops = _compile(model)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    assert _graph_breaks() == 0
    assert "hf_basis.quant_lookup.default" in ops


def test_compiled_generation_with_static_cache():
    model = _model("llama").eval()
    ids = _ids()[:, :5]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "cache_implementation": "static",
              "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    ref = model.generate(ids, **kwargs)
    model.forward, ops = _compile(model.forward)
    assert torch.equal(model.generate(ids, **kwargs), ref)
    assert _graph_breaks() == 0 and "hf_basis.basis_linear.default" in ops


def test_export_inference_and_training_forward():
    model = _model("llama")
    ids = _ids()
    labels = _ids(1)
    model.eval()
    exported = torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits)
    model.train()
    exported = torch.export.export(model, (), {"input_ids": ids, "labels": labels, "use_cache": False})
    assert any("hf_basis.basis_cross_entropy" in str(n.target) for n in exported.graph.nodes)
    plain = copy.deepcopy(model)
    uninstall_fused_loss(plain)
    torch.testing.assert_close(exported.module()(input_ids=ids, labels=labels, use_cache=False).loss,
                               plain(input_ids=ids, labels=labels, use_cache=False).loss, rtol=1e-5, atol=1e-6)


def test_inductor_compiles_the_ops():
    """inductor (C++ on CPU) runs the custom ops' forward and backward: loss and gradients as in eager."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 16, generator=g)
    centroids = torch.randn(4, 8, 4, generator=g)
    codes = torch.randint(0, 8, (50, 4), generator=g)
    bias = torch.randn(50, generator=g)
    labels = torch.randint(0, 50, (6,), generator=g)

    def step(hidden, centroids, bias):
        return basis_cross_entropy(hidden, centroids, codes, bias, labels) + basis_linear(
            hidden, centroids, codes, bias).logsumexp(-1).mean()

    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(step, backend="inductor", fullgraph=True), step):
        args = [t.clone().requires_grad_() for t in (hidden, centroids, bias)]
        loss = fn(*args)
        loss.backward()
        results.append((loss, *[a.grad for a in args]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
