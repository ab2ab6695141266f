"""PQ-aware training (hf_basis.prepare_pq_aware_training): the forward is the product quantization of the weight,
the gradient reaches the dense weight unchanged, a refresh is one weighted Lloyd step, and convert() keeps the
trained codebook exactly."""

import pytest
import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

import hf_basis
from hf_basis.models.lstm import LSTMLMConfig, LSTMLMForCausalLM
from hf_basis.pq_aware_training import FakeProductQuantize, fake_quantizers

V, H, B, K = 120, 16, 4, 8


def _model(tie=False):
    torch.manual_seed(0)
    return LSTMLMForCausalLM(LSTMLMConfig(vocab_size=V, emsize=H, nhid=H, nlayers=1, dropout=0.0,
                                          tie_word_embeddings=tie))


def _decoded(codes, centroids):
    """Independent decode: row w is the concatenation of centroids[b, codes[w, b]], by loops."""
    return torch.stack([torch.cat([centroids[b, int(codes[w, b])] for b in range(codes.shape[1])])
                        for w in range(codes.shape[0])])


def test_forward_is_the_quantized_weight_and_gradients_reach_centroids_and_dense_rows():
    model = _model()
    ids = torch.randint(0, V, (3, 7))
    hf_basis.prepare_pq_aware_training(model, B, K, modules="both")
    (emb, q_emb), (head, q_head) = fake_quantizers(model)
    assert emb is model.get_input_embeddings() and head is model.get_output_embeddings()

    # Reference: the same model with plain layers holding the decoded matrices, and converted layers with the same
    # codebooks (the centroids' gradient of a BasisLinear / BasisEmbedding).
    reference = _model()
    with torch.no_grad():
        reference.load_state_dict({k: v for k, v in model.state_dict().items() if "parametrizations" not in k},
                                  strict=False)
        reference.encoder.weight.copy_(_decoded(q_emb.codes, q_emb.centroids))
        reference.lm_head.weight.copy_(_decoded(q_head.codes, q_head.centroids))
    out, ref = model(ids, labels=ids), reference(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits)
    out.loss.backward()
    ref.loss.backward()
    # The dense rows get exactly the gradient of the decoded matrix (straight through) ...
    torch.testing.assert_close(emb.parametrizations.weight.original.grad, reference.encoder.weight.grad)
    torch.testing.assert_close(head.parametrizations.weight.original.grad, reference.lm_head.weight.grad)
    # ... and each centroid the sum of the gradients of the rows' sub-vectors that use it.
    for quantizer, grad in ((q_emb, reference.encoder.weight.grad), (q_head, reference.lm_head.weight.grad)):
        expected = torch.zeros_like(quantizer.centroids)
        sub = grad.view(V, B, H // B)
        for w in range(V):
            for b in range(B):
                expected[b, quantizer.codes[w, b]] += sub[w, b]
        torch.testing.assert_close(quantizer.centroids.grad, expected)


def test_refresh_gives_each_row_its_nearest_codes_and_pulls_the_dense_rows_back():
    torch.manual_seed(1)
    W = torch.randn(V, H)
    quantizer = FakeProductQuantize(W, B, K, sample_weight=torch.rand(V) + 0.1)
    before = quantizer.codes.clone()
    centroids = quantizer.centroids.detach().clone()
    moved = W + 0.5 * torch.randn(V, H)
    dense = moved.clone()
    changed = quantizer.refresh(dense, pull=0.25)
    X = moved.view(V, B, H // B)
    codes = torch.stack([torch.cdist(X[:, b], centroids[b]).argmin(1) for b in range(B)], 1)  # by hand
    assert torch.equal(quantizer.codes, codes)
    torch.testing.assert_close(quantizer.centroids.detach(), centroids)  # the centroids only train
    assert changed == pytest.approx(float((codes != before).any(1).float().mean())) and changed > 0
    torch.testing.assert_close(dense, moved + 0.25 * (_decoded(codes, centroids) - moved))
    untouched = moved.clone()
    FakeProductQuantize(W, B, K).refresh(untouched, pull=0.0)
    assert torch.equal(untouched, moved)


def test_convert_keeps_the_trained_codebook_exactly():
    model = _model()
    hf_basis.prepare_pq_aware_training(model, B, K, modules="output", token_frequencies=torch.arange(V) + 1.0)
    (_, quantizer), = fake_quantizers(model)
    model.eval()
    ids = torch.randint(0, V, (2, 9))
    before = model(ids).logits
    with pytest.raises(ValueError, match="num_clusters=8"):
        hf_basis.convert(model, B, 16, modules="output")
    with pytest.raises(ValueError, match="head_input_moment"):
        hf_basis.convert(model, B, K, modules="output", head_input_moment=torch.eye(H))
    assert fake_quantizers(model)  # refused before anything changed
    hf_basis.convert(model, B, K, modules="output")
    assert isinstance(model.lm_head, hf_basis.BasisLinear)
    assert torch.equal(model.lm_head.codebook.codes.long(), quantizer.codes)
    torch.testing.assert_close(model(ids).logits, before)


def test_bad_input_is_refused_before_the_model_changes():
    with pytest.raises(NotImplementedError, match="tied"):
        hf_basis.prepare_pq_aware_training(_model(tie=True), B, K, modules="both")
    model = _model()
    with pytest.raises(ValueError, match="modules"):
        hf_basis.prepare_pq_aware_training(model, B, K, modules="head")
    with pytest.raises(ValueError, match="token_frequencies"):
        hf_basis.prepare_pq_aware_training(model, B, K, token_frequencies=torch.ones(V + 1))
    assert not fake_quantizers(model)
    hf_basis.prepare_pq_aware_training(model, B, K, modules="input")
    with pytest.raises(ValueError, match="already parametrized"):
        hf_basis.prepare_pq_aware_training(model, B, K, modules="input")
    with pytest.raises(ValueError, match="refresh_steps"):
        hf_basis.PQAwareTrainingCallback(refresh_steps=0)
    with pytest.raises(ValueError, match="pull"):
        hf_basis.PQAwareTrainingCallback(pull=1.5)


def test_callback_refreshes_every_n_steps_and_logs_each_epoch(monkeypatch):
    model = _model()
    hf_basis.prepare_pq_aware_training(model, B, K, modules="output")
    calls = []
    monkeypatch.setattr(FakeProductQuantize, "refresh",
                        lambda self, weight, pull: (calls.append((weight, pull)), 0.25)[1])
    callback = hf_basis.PQAwareTrainingCallback(refresh_steps=3, pull=0.5)
    state, control = TrainerState(), TrainerControl()
    args = TrainingArguments(output_dir="unused", report_to=[])
    callback.on_epoch_begin(args, state, control, model=model)
    quantizer = fake_quantizers(model)[0][1]
    quantizer.codes[:3, 0] = (quantizer.codes[:3, 0] + 1) % K  # 3 of the V words end the epoch on other codes
    for step in range(1, 8):
        state.global_step = step
        callback.on_step_end(args, state, control, model=model)
    assert len(calls) == 2  # steps 3 and 6
    assert calls[0][0] is model.lm_head.parametrizations.weight.original and calls[0][1] == 0.5
    state.epoch = 1.0
    callback.on_epoch_end(args, state, control, model=model)
    assert state.log_history[-1]["pq_codes_changed"] == 0.25 and "pq_relative_error" in state.log_history[-1]
    assert state.log_history[-1]["pq_codes_moved"] == pytest.approx(3 / V)


def test_embedding_and_linear_types_are_required():
    class NoEmb(nn.Module):
        def get_input_embeddings(self):
            return nn.Identity()

        def get_output_embeddings(self):
            return None

    with pytest.raises(TypeError, match="nn.Embedding"):
        hf_basis.prepare_pq_aware_training(NoEmb(), B, K, modules="input")
