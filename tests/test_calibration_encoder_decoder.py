"""head_input_moment on encoder-decoder models: the output layer sees the decoder's positions (issue 15, item 3)."""

import pytest
import torch

import hf_basis
from tiny_models import tiny_model


def decoder_head_inputs(model, batch):
    """By hand: the decoder's last hidden states as T5's lm_head receives them (scaled by d_model^-0.5 when the
    config says so)."""
    with torch.no_grad():
        h = model(**batch, output_hidden_states=True).decoder_hidden_states[-1]
    return h * model.config.d_model**-0.5 if model.config.scale_decoder_outputs else h


def moment(rows):
    H = torch.cat(rows).double()
    return (H.T @ H / H.shape[0]).float()


@pytest.fixture
def t5():
    return tiny_model("t5", vocab_size=120, hidden=16)


def batches(with_decoder_mask):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        # Same encoder and decoder length: the encoder's mask would fit the decoder's positions and be used silently.
        batch = {"input_ids": torch.randint(0, 120, (2, 6), generator=g),
                 "attention_mask": torch.tensor([[1] * 6, [1] * 2 + [0] * 4]),
                 "decoder_input_ids": torch.randint(0, 120, (2, 6), generator=g)}
        if with_decoder_mask:
            batch["decoder_attention_mask"] = torch.tensor([[1] * 4 + [0] * 2, [1] * 6])
        out.append(batch)
    return out


def test_decoder_positions_without_a_decoder_mask_all_count(t5):
    data = batches(with_decoder_mask=False)
    expected = moment([decoder_head_inputs(t5, b).reshape(-1, 16) for b in data])
    torch.testing.assert_close(hf_basis.head_input_moment(t5, data), expected, rtol=1e-4, atol=1e-6)


def test_decoder_attention_mask_selects_the_positions(t5):
    data = batches(with_decoder_mask=True)
    expected = moment([decoder_head_inputs(t5, b)[b["decoder_attention_mask"].bool()] for b in data])
    assert sum(int(b["decoder_attention_mask"].sum()) for b in data) == 20
    torch.testing.assert_close(hf_basis.head_input_moment(t5, data), expected, rtol=1e-4, atol=1e-6)


def test_a_mask_that_does_not_fit_the_head_positions_is_refused():
    model = tiny_model("llama", vocab_size=120, hidden=16, tie=False)
    batch = {"input_ids": torch.randint(0, 120, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "logits_to_keep": 1}  # the head sees one position per sequence
    with pytest.raises(ValueError, match="attention_mask has shape"):
        hf_basis.head_input_moment(model, [batch])
