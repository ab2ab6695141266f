"""LSTMLMForCausalLM: config validation, forward/loss conventions, recurrent state, generation, save/load, convert."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import hf_basis
from hf_basis.models.lstm import STATE_FIELD, LSTMLMConfig, LSTMLMForCausalLM, LSTMState

V = 50


def tiny(**kwargs) -> LSTMLMForCausalLM:
    config = LSTMLMConfig(**{"vocab_size": V, "emsize": 16, "nhid": 16, "nlayers": 2, "dropout": 0.1, **kwargs})
    return LSTMLMForCausalLM(config).eval()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rnn_type": "LSTMX"}, "rnn_type must be one of"),
        ({"tie_word_embeddings": True, "emsize": 16, "nhid": 32}, "emsize == nhid"),
        ({"dropout": 1.0}, "dropout"),
        ({"nlayers": 0}, "nlayers"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LSTMLMConfig(**kwargs)


def test_registered_with_auto_classes():
    config = AutoConfig.for_model("lstm_lm", vocab_size=V, emsize=8, nhid=8, nlayers=1)
    assert isinstance(config, LSTMLMConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), LSTMLMForCausalLM)
    assert hf_basis.LSTMLMConfig is LSTMLMConfig and hf_basis.LSTMLMForCausalLM is LSTMLMForCausalLM


def test_init_follows_word_language_model():
    model = tiny()
    assert model.encoder.weight.abs().max() <= 0.1 and model.lm_head.weight.abs().max() <= 0.1
    assert model.encoder.weight.std() > 0.04  # U(-0.1, 0.1), not 0.02-normal
    assert torch.count_nonzero(model.lm_head.bias) == 0
    assert all(p.abs().max() <= 16**-0.5 for p in model.rnn.parameters())


@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_forward_backward_every_rnn_type(rnn_type):
    model = tiny(rnn_type=rnn_type).train()
    x = torch.randint(0, V, (3, 7))
    out = model(x, labels=x)
    assert out.logits.shape == (3, 7, V)
    state = out[STATE_FIELD]
    assert isinstance(state, LSTMState) and state.h.shape == (2, 3, 16)
    assert (state.c is not None) == (rnn_type == "LSTM")
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_loss_follows_transformers_causal_lm_conventions():
    model = tiny()
    x = torch.randint(0, V, (2, 6))
    labels = x.clone()
    labels[0, 3] = -100
    out = model(x, labels=labels)
    logits = out.logits
    # labels are shifted inside: position t predicts labels[t + 1]; -100 is ignored.
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # num_items_in_batch (the Trainer's gradient-accumulation count) -> sum / num_items.
    summed = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100,
                             reduction="sum")
    torch.testing.assert_close(model(x, labels=labels, num_items_in_batch=torch.tensor(40)).loss, summed / 40)
    # shift_labels: targets already aligned with the logits (truncated BPTT passes the token after the window).
    targets = torch.randint(0, V, (2, 6))
    aligned = model(x, labels=x, shift_labels=targets).loss
    torch.testing.assert_close(aligned, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)))
    torch.testing.assert_close(model(x, shift_labels=targets).loss, aligned)


def test_state_continues_the_sequence():
    model = tiny()
    x = torch.randint(0, V, (2, 9))
    full = model(x)
    first = model(x[:, :4])
    rest = model(x[:, 4:], past_key_values=first[STATE_FIELD])
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), full.logits)
    torch.testing.assert_close(rest[STATE_FIELD].h, full[STATE_FIELD].h)
    assert getattr(model(x, use_cache=False), STATE_FIELD) is None
    assert model(x, logits_to_keep=1).logits.shape == (2, 1, V)


def test_padding_mask_leaves_the_state_untouched():
    model = tiny()
    x = torch.randint(2, V, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    a, b = model(x), model(padded, attention_mask=mask)
    torch.testing.assert_close(b.logits[:, 3:], a.logits)
    torch.testing.assert_close(b[STATE_FIELD].c, a[STATE_FIELD].c)


def _manual_greedy(model, prompt, steps):
    out = model(prompt)
    ids, state = prompt, out[STATE_FIELD]
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        out = model(token, past_key_values=state)
        state = out[STATE_FIELD]
    return ids


def test_generate_continues_from_the_state():
    model = tiny()
    prompt = torch.randint(0, V, (2, 5))
    lengths = []
    handle = model.rnn.register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
    handle.remove()
    # The prompt runs once; each later step feeds only the newest token (the state holds the rest).
    assert lengths == [5] + [1] * 5
    torch.testing.assert_close(generated, _manual_greedy(model, prompt, 6))


def test_generate_sampling_and_beams():
    model = tiny()
    prompt = torch.randint(0, V, (2, 4))
    mask = torch.ones_like(prompt)
    torch.manual_seed(1)
    a = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(1)
    b = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=0)
    assert a.shape == (2, 12) and torch.equal(a, b) and a.max() < V
    beams = model.generate(prompt, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False,
                           pad_token_id=0)
    assert beams.shape == (2, 8)


def test_generate_left_padded_batch_matches_single_prompts():
    model = tiny()
    long, short = torch.randint(2, V, (1, 6)), torch.randint(2, V, (1, 3))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    single = model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=5, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(out[1, -5:], single[0, -5:])


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_with_auto_model(tmp_path, tie):
    model = tiny(tie_word_embeddings=tie)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LSTMLMForCausalLM)
    assert (loaded.lm_head.weight is loaded.encoder.weight) == tie
    x = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize(
    "modules, tie, shared",
    [("input", False, False), ("output", False, False), ("both", False, False), ("both", True, True)],
)
def test_convert_basis(modules, tie, shared):
    model = tiny(tie_word_embeddings=tie)
    hf_basis.convert(model, num_basis=4, num_clusters=8, modules=modules)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, hf_basis.BasisEmbedding) == (modules != "output")
    assert isinstance(head, hf_basis.BasisLinear) == (modules != "input")
    if modules == "both":
        assert (emb.codebook is head.codebook) == shared
    x = torch.randint(0, V, (2, 6))
    model.train()
    out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert hf_basis.report(model).compression_ratio > 1
    model.eval()
    assert model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, pad_token_id=0).shape == (2, 9)


def test_convert_quant():
    model = tiny()
    hf_basis.convert(model, method="quant", nbit=4, modules="both")
    x = torch.randint(0, V, (2, 6))
    assert torch.isfinite(model(x, labels=x).loss)


@pytest.mark.parametrize("tie", [False, True])
def test_converted_model_saves_and_loads(tmp_path, tie):
    model = tiny(tie_word_embeddings=tie)
    hf_basis.convert(model, num_basis=4, num_clusters=8, modules="both")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.get_output_embeddings(), hf_basis.BasisLinear)
    assert (loaded.get_input_embeddings().codebook is loaded.get_output_embeddings().codebook) == tie
    x = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
