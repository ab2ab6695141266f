"""`.weight` of the compressed modules: what code written for nn.Embedding / nn.Linear does with it.

Freezing through `weight.requires_grad_(False)` must freeze the module (as it freezes an nn.Embedding), writes into
the decoded copy must raise instead of being silently lost, and reads must equal the dense matrix decoded by hand.
"""

import io
import pickle

import pytest
import torch
from torch import nn

import hf_basis
from tiny_models import tiny_model

V, H = 300, 32


def converted(method: str, tie: bool = True) -> nn.Module:
    model = tiny_model("llama", vocab_size=V, hidden=H, tie=tie)
    kwargs = {"num_basis": 4, "num_clusters": 16} if method == "basis" else {"method": "quant", "nbit": 4}
    return hf_basis.convert(model, **kwargs)


def hand_decoded(book) -> torch.Tensor:
    B = book.codes.shape[1]
    return torch.stack([torch.cat([book.centroids[b, int(book.codes[w, b])] for b in range(B)]) for w in range(V)])


def test_basis_weight_reads_the_hand_decoded_matrix():
    model = converted("basis")
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        torch.testing.assert_close(layer.weight, hand_decoded(layer.codebook), rtol=0, atol=0)
    copy = model.get_input_embeddings().weight.clone()  # a plain, writable tensor
    assert type(copy) is torch.Tensor
    copy[0] = 1.0


def test_quant_linear_has_the_weight_its_forward_multiplies_by():
    model = converted("quant", tie=False)
    head = model.get_output_embeddings()
    weight = head.weight
    assert weight.shape == (V, H) and not weight.requires_grad
    x = torch.randn(5, H)
    torch.testing.assert_close(head(x), x @ weight.T)
    tied = converted("quant", tie=True)
    torch.testing.assert_close(tied.get_output_embeddings().weight, tied.get_input_embeddings().weight, rtol=0, atol=0)


def trained_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    model.train()
    ids = torch.randint(0, V, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("how", ["requires_grad_", "attribute"])
def test_freezing_through_weight_freezes_the_centroids_like_nn_embedding(how):
    dense = tiny_model("llama", vocab_size=V, hidden=H, tie=False)
    model = converted("basis", tie=False)
    for m in (dense, model):
        emb = m.get_input_embeddings()
        if how == "requires_grad_":
            emb.weight.requires_grad_(False)
        else:
            m.get_input_embeddings().weight.requires_grad = False
        assert emb.weight.requires_grad is False
    assert model.get_input_embeddings().codebook.centroids.requires_grad is False
    assert model.get_output_embeddings().codebook.centroids.requires_grad is True  # untied head: not touched
    dense_grads, grads = trained_grads(dense), trained_grads(model)
    assert dense_grads["model.embed_tokens.weight"] is None
    assert grads["model.embed_tokens.codebook.centroids"] is None
    assert grads["lm_head.codebook.centroids"] is not None
    model.get_input_embeddings().weight.requires_grad_(True)  # and back
    assert model.get_input_embeddings().codebook.centroids.requires_grad is True


def test_freezing_a_tied_weight_freezes_the_shared_codebook_but_not_the_head_bias():
    model = converted("basis", tie=True)
    model.get_output_embeddings().weight.requires_grad_(False)
    assert model.get_input_embeddings().weight.requires_grad is False
    assert model.get_input_embeddings().codebook.centroids.requires_grad is False


def test_quant_weight_freezes_quietly_and_refuses_to_train():
    model = converted("quant", tie=False)
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        layer.weight.requires_grad_(False)
        with pytest.raises(RuntimeError, match="frozen"):
            layer.weight.requires_grad_(True)


WRITES = {
    "weight.data[5] = v": lambda w: w.data.__setitem__(5, 1.0),
    "weight[5] = v under no_grad": lambda w: w.__setitem__(5, 1.0),
    "weight.data.copy_": lambda w: w.data.copy_(torch.zeros(w.shape)),
    "nn.init.normal_": lambda w: nn.init.normal_(w),
    "weight.data = t": lambda w: setattr(w, "data", torch.zeros(w.shape)),
    "weight.data += t": lambda w: w.data.__iadd__(1.0),
    "index_copy_": lambda w: w.data.index_copy_(0, torch.tensor([1]), torch.zeros(1, w.shape[1])),
    "out=": lambda w: torch.add(torch.ones(w.shape), 1.0, out=w),
}


@pytest.mark.parametrize("method", ["basis", "quant"])
@pytest.mark.parametrize("write", list(WRITES))
def test_writes_into_the_decoded_weight_raise_and_change_nothing(method, write):
    model = converted(method, tie=False)
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            with pytest.raises(RuntimeError, match="read-only.*dequantize"):
                WRITES[write](layer.weight)
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_weight_reads_into_other_tensors_and_carries_gradients():
    model = converted("basis", tie=False)
    head = model.get_output_embeddings()
    target = torch.empty(V, H)
    target.copy_(head.weight)  # the decoded weight as a source is fine
    torch.testing.assert_close(target, hand_decoded(head.codebook), rtol=0, atol=0)
    x = torch.randn(3, H)
    (x @ head.weight.T).square().sum().backward()  # interop code that multiplies by .weight still trains
    via_weight = head.codebook.centroids.grad.clone()
    head.codebook.centroids.grad = None
    assert head.bias is None  # Llama's head: x @ W^T is the whole output
    head(x).square().sum().backward()
    torch.testing.assert_close(via_weight, head.codebook.centroids.grad)


def test_saved_or_pickled_weight_is_a_plain_tensor():
    weight = converted("basis").get_input_embeddings().weight
    buffer = io.BytesIO()
    torch.save(weight, buffer)
    buffer.seek(0)
    for restored in (torch.load(buffer), pickle.loads(pickle.dumps(weight))):
        assert type(restored) is torch.Tensor
        torch.testing.assert_close(restored, weight.detach(), rtol=0, atol=0)


def test_transformers_guarded_init_skips_the_decoded_weight():
    # T5's `_init_weights` calls `transformers.initialization.normal_(model.shared.weight)` while loading: the
    # compressed layer is initialised already, so the guarded init must skip it rather than raise or write.
    from transformers import initialization

    model = converted("basis")
    before = model.get_input_embeddings().weight.detach().clone()
    initialization.normal_(model.get_input_embeddings().weight, mean=0.0, std=1.0)
    torch.testing.assert_close(model.get_input_embeddings().weight, before, rtol=0, atol=0)
