"""head_input_moment against the hidden states transformers returns for the same inputs."""

import pytest
import torch

import hf_basis
from tiny_models import tiny_model


def test_moment_matches_last_hidden_states_and_skips_padding():
    model = tiny_model("llama", vocab_size=120, hidden=16, tie=False).train()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 120, (2, 9), generator=g),
                "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4])} for _ in range(3)]
    moment = hf_basis.head_input_moment(model, batches)
    assert model.training  # restored
    model.eval()
    rows = []
    with torch.no_grad():
        for batch in batches:
            h = model(**batch, output_hidden_states=True).hidden_states[-1]  # after the final norm: the head's input
            rows.append(h[batch["attention_mask"].bool()])
    H = torch.cat(rows).double()
    assert H.shape[0] == 3 * 14
    torch.testing.assert_close(moment, (H.T @ H / H.shape[0]).float(), rtol=1e-4, atol=1e-6)


def test_max_tokens_and_tensor_batches():
    model = tiny_model("gpt2", vocab_size=100, hidden=16)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[-1].reshape(-1, 16)[:5].double()
    torch.testing.assert_close(hf_basis.head_input_moment(model, [ids, ids], max_tokens=5),
                               (h.T @ h / 5).float(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no token positions"):
        hf_basis.head_input_moment(model, [])
    with pytest.raises(ValueError, match="max_tokens"):
        hf_basis.head_input_moment(model, [ids], max_tokens=0)
