"""Converted causal LMs train through the fused basis cross-entropy (no logits built) and match the unfused loss.

Covers GPT-2, Llama, Qwen2, Gemma 2 (final-logit soft-capping) and the project's LSTM LM; real logits everywhere else
(eval, no labels, no grad, generate); 20 training steps fused vs unfused; the Trainer's num_items_in_batch
normalisation under gradient accumulation. CPU, tiny models, PyTorch reference path of the op.
"""

import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import hf_basis
from hf_basis.integrations import fused_loss
from hf_basis.integrations.fused_loss import FusedCausalLMLoss, install_fused_loss, uninstall_fused_loss
from hf_basis.modules.lazy_logits import LazyLogits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import tiny_model  # noqa: E402

V = 300
ARCHS = ["gpt2", "llama", "qwen2", "gemma2", "lstm"]


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _model(arch, softcap=0.5):
    if arch == "gemma2":
        cfg = transformers.Gemma2Config(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=64, final_logit_softcapping=softcap,
            tie_word_embeddings=False,
        )
        model = transformers.Gemma2ForCausalLM(cfg)
        modules = "output"  # Gemma scales its embedding in a subclass forward: convert() compresses the head only
    elif arch == "lstm":
        from hf_basis.models.lstm import LSTMLMConfig, LSTMLMForCausalLM

        model = LSTMLMForCausalLM(LSTMLMConfig(vocab_size=V, emsize=32, nhid=32, nlayers=1, dropout=0.0))
        modules = "both"
    else:
        model = tiny_model(arch, vocab_size=V, hidden=32)
        modules = "both"
    hf_basis.convert(model, num_basis=4, num_clusters=16, modules=modules)
    return _no_dropout(model).train()


def _batch(seed=0, batch=2, seq=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_loss_matches_unfused(arch):
    fused = _model(arch)
    plain = copy.deepcopy(fused)
    uninstall_fused_loss(plain)
    assert isinstance(fused.loss_function, FusedCausalLMLoss) and not isinstance(plain.loss_function, FusedCausalLMLoss)
    ids, labels = _batch()

    out = fused(input_ids=ids, labels=labels)
    assert isinstance(out.logits, LazyLogits) and out.logits.shape == (2, 9, V)
    assert out.logits._value is None  # the loss never built the logits
    if arch == "gemma2":
        assert out.logits.softcap == 0.5  # logits / cap, tanh, * cap stayed lazy: fused with softcap
    out.loss.backward()
    ref = plain(input_ids=ids, labels=labels)
    assert type(ref.logits) is torch.Tensor
    ref.loss.backward()

    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    g, g_ref = _grads(fused), _grads(plain)
    assert g.keys() == g_ref.keys() and any("centroids" in n for n in g)
    for name in g_ref:
        assert _rel(g[name], g_ref[name]) < 1e-4, name


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
def test_real_logits_outside_fused_training(arch):
    model = _model(arch)
    ids, labels = _batch()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    assert type(dense) is torch.Tensor
    model.eval()
    assert type(model(input_ids=ids, labels=labels).logits) is torch.Tensor  # evaluation
    model.train()
    with torch.no_grad():
        assert type(model(input_ids=ids, labels=labels).logits) is torch.Tensor  # no grad
    last = model(input_ids=ids, logits_to_keep=1).logits  # no labels
    assert type(last) is torch.Tensor and last.shape == (2, 1, V)
    torch.testing.assert_close(last, dense[:, -1:])
    model.eval()
    generated = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 7)


def test_lazy_logits_materialise_correctly():
    """User code that reads the lazy logits gets the real values, with gradients (just not fused)."""
    model = _model("llama")
    ids, labels = _batch()
    out = model(input_ids=ids, labels=labels)
    logits = out.logits
    assert isinstance(logits, LazyLogits)
    with torch.no_grad():
        model.eval()
        real = model(input_ids=ids).logits
        model.train()
    own = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1))  # materialises
    torch.testing.assert_close(own, out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.float(), real)
    assert logits.dim() == 3 and logits.size(-1) == V and logits.dtype == real.dtype  # metadata: no compute
    own.backward()
    assert model.get_output_embeddings().codebook.centroids.grad is not None


def test_dtype_cast_stays_lazy():
    """`.float()` / `.to(dtype)` only change the dtype the logits report; other conversions materialise."""
    model = _model("llama").to(torch.bfloat16)
    ids, labels = _batch()
    logits = model(input_ids=ids, labels=labels).logits
    assert isinstance(logits, LazyLogits) and logits.dtype == torch.bfloat16
    up = logits.float()
    assert isinstance(up, LazyLogits) and up.dtype == torch.float32 and up.fusable
    assert logits.to(dtype=torch.bfloat16) is logits
    back = up.to(torch.float16)
    assert isinstance(back, LazyLogits) and back.dtype == torch.float16
    assert logits._value is None and up._value is None and back._value is None  # nothing computed yet
    real = logits.materialize()
    assert real.dtype == torch.bfloat16
    assert torch.equal(up.materialize(), real.float())  # computed in the head's dtype, then cast, like .float()
    assert torch.equal(back.materialize(), real.to(torch.float16))
    ints = model(input_ids=ids, labels=labels).logits.to(torch.int32)  # not a floating dtype: a real tensor
    assert type(ints) is torch.Tensor and ints.dtype == torch.int32


def test_trainer_mixed_precision_never_builds_logits(tmp_path, monkeypatch):
    """Trainer bf16=True: accelerate upcasts the outputs with `.float()` after the loss; the logits stay unbuilt."""
    built = []
    materialize = LazyLogits.materialize
    monkeypatch.setattr(LazyLogits, "materialize", lambda self: built.append(self.shape) or materialize(self))
    model = _model("llama").to(torch.bfloat16)
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out))  # sees the wrapped forward's output
    ids, labels = _batch(batch=4)
    data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, bf16=True,
        report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", seed=0, dataloader_num_workers=0,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert len(outputs) == 2 and all(isinstance(out.logits, LazyLogits) for out in outputs)
    assert all(out.logits.dtype == torch.float32 for out in outputs)  # the upcast happened, lazily
    assert built == []


def test_train_20_steps_gpt2_matches_unfused():
    torch.manual_seed(0)
    fused = _model("gpt2")
    plain = copy.deepcopy(fused)
    uninstall_fused_loss(plain)
    losses = {}
    for name, model in (("fused", fused), ("plain", plain)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for step in range(20):
            ids, labels = _batch(seed=step, batch=4, seq=12)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["fused"][-1] < losses["fused"][0]  # it trains
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["plain"]), rtol=1e-4, atol=1e-5)


class _GradCapture(transformers.TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = _grads(model)


def _trainer_grads(model, data, batch, accumulation, tmp_path):
    capture = _GradCapture()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, report_to="none", use_cpu=True, save_strategy="no",
        logging_strategy="no", seed=0, dataloader_num_workers=0,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[capture]).train()
    return capture.grads


def test_trainer_gradient_accumulation_equivalence(tmp_path, monkeypatch):
    """Accumulation 4 x batch 2 gives the gradients of one batch of 8 (num_items_in_batch), through the fused loss."""
    calls = []
    real_ce = fused_loss.basis_cross_entropy
    monkeypatch.setattr(fused_loss, "basis_cross_entropy", lambda *a, **k: calls.append(k["reduction"]) or
                        real_ce(*a, **k))
    g = torch.Generator().manual_seed(3)
    data = []
    for i in range(8):
        ids = torch.randint(0, V, (10,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(0, 8, (1,), generator=g))] = -100  # different token counts per sequence
        data.append({"input_ids": ids, "labels": labels})
    base = _model("gpt2")
    plain = copy.deepcopy(base)
    uninstall_fused_loss(plain)

    g_acc = _trainer_grads(copy.deepcopy(base), data, 2, 4, tmp_path / "acc")
    assert calls == ["sum"] * 4  # fused, normalised by num_items_in_batch
    g_one = _trainer_grads(copy.deepcopy(base), data, 8, 1, tmp_path / "one")
    g_ref = _trainer_grads(plain, data, 8, 1, tmp_path / "ref")
    assert g_acc.keys() == g_one.keys() == g_ref.keys()
    for name in g_one:
        assert _rel(g_acc[name], g_one[name]) < 1e-5, name
        assert _rel(g_one[name], g_ref[name]) < 1e-4, name


def test_install_rules_and_pickling():
    bert = tiny_model("bert-mlm", vocab_size=V, hidden=32)
    hf_basis.convert(bert, num_basis=4, num_clusters=16)
    assert not fused_loss.fused_loss_installed(bert)  # not a causal-LM loss: left alone
    dense = tiny_model("gpt2", vocab_size=V, hidden=32)
    assert not install_fused_loss(dense)  # dense head: nothing to fuse
    model = _model("qwen2")
    assert install_fused_loss(model)  # idempotent
    clone = pickle.loads(pickle.dumps(model))
    ids, labels = _batch()
    torch.testing.assert_close(clone(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss)
