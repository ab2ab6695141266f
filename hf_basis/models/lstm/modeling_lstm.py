"""LSTMLMForCausalLM: PyTorch's word_language_model RNN LM as a transformers model (Trainer, generate, Hub).

    input_ids (B, T) -> encoder (B, T, emsize) -> dropout -> rnn (B, T, nhid) -> dropout -> lm_head (B, T, V)

The recurrent state is the model's cache: forward takes it as `past_key_values` and returns the new one in the
output's cache field, so `generate()` feeds one token per step instead of re-running the prefix, and a stateful
trainer can carry it across truncated-BPTT windows.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from hf_basis.models.lstm.configuration_lstm import LSTMLMConfig

# transformers renamed the cache field of model outputs from `past_key_values` (<= 5.23) to `cache` (5.24+). The state
# is returned under the installed version's name, so generate() and the Trainer find it where they look for a cache;
# read it with `outputs[STATE_FIELD]`.
STATE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

_RNN_CLASSES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}


class LSTMState:
    """The recurrent state of an LSTMLMForCausalLM: what a KV cache is to a transformer.

    Attributes:
        h: (nlayers, B, nhid) hidden state of every layer after the last token.
        c: (nlayers, B, nhid) LSTM cell state, or None for GRU / plain RNN.
    """

    # Read by generate() on some code paths (torch.compile, deferred stop checks): a state is neither.
    is_compileable = False
    is_croppable = False

    def __init__(self, h: torch.Tensor, c: torch.Tensor | None = None) -> None:
        self.h = h
        self.c = c

    @classmethod
    def from_rnn(cls, hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> "LSTMState":
        """Wrap what nn.LSTM (a (h, c) tuple) or nn.GRU / nn.RNN (h) return."""
        return cls(*hx) if isinstance(hx, tuple) else cls(hx)

    @property
    def hx(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The state in the form nn.LSTM / nn.GRU / nn.RNN take it."""
        return self.h if self.c is None else (self.h, self.c)

    @property
    def batch_size(self) -> int:
        return self.h.shape[1]

    def detach(self) -> "LSTMState":
        """The same values cut from the autograd graph (truncated BPTT: gradients stop at the window border)."""
        return LSTMState(self.h.detach(), None if self.c is None else self.c.detach())

    def index_select(self, index: torch.Tensor) -> "LSTMState":
        """Rows `index` (1-D, long) of the batch: used to reorder beams."""
        index = index.to(self.h.device)
        return LSTMState(self.h.index_select(1, index), None if self.c is None else self.c.index_select(1, index))

    def __repr__(self) -> str:
        return f"LSTMState(h={tuple(self.h.shape)}, c={None if self.c is None else tuple(self.c.shape)})"


class LSTMLMPreTrainedModel(PreTrainedModel):
    """Class attributes and weight initialisation shared by the LSTM LM heads."""

    config_class = LSTMLMConfig
    base_model_prefix = "lstm_lm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = []
    # The state cannot be rolled back, so generate() refuses assisted decoding.
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """word_language_model's scheme: embedding and head U(-r, r), head bias 0, RNN as PyTorch does it."""
        r = self.config.init_range
        if isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -r, r)
        elif isinstance(module, nn.Linear):
            init.uniform_(module.weight, -r, r)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.RNNBase):
            bound = 1.0 / math.sqrt(module.hidden_size)
            for param in module.parameters():
                init.uniform_(param, -bound, bound)


class LSTMLMForCausalLM(LSTMLMPreTrainedModel, GenerationMixin):
    """Word-level recurrent language model (Zaremba et al. 2014; PyTorch's word_language_model) with an LM head.

    Args:
        config: an LSTMLMConfig.

    Forward:
        input_ids: (B, T) token ids (or `inputs_embeds`: (B, T, emsize)).
        attention_mask: (B, T) optional, 1 = token, 0 = padding. Padding positions leave the state untouched (the
            slow per-step path runs only when the mask holds a 0), so left-padded prompts generate like unpadded ones.
        past_key_values: an LSTMState to continue from (None = zeros).
        labels: (B, T) optional; shifted inside as transformers' causal LMs do (`labels = input_ids` works;
            -100 is ignored). Pass `shift_labels` (B, T) instead (or as well) when the targets are already aligned,
            e.g. the next token after each window in truncated BPTT.
        use_cache: return the new state (defaults to `config.use_cache`).
        logits_to_keep: if > 0, compute logits for the last `logits_to_keep` positions only.
        **kwargs: loss keyword arguments (`num_items_in_batch`, `shift_labels`, `ignore_index`).

    Returns:
        CausalLMOutputWithPast with `loss` (if labels), `logits` (B, T, V) and the LSTMState in the cache field
        (`outputs[STATE_FIELD]`; `past_key_values` in transformers <= 5.23, `cache` from 5.24).
    """

    _tied_weights_keys = {"lm_head.weight": "encoder.weight"}

    def __init__(self, config: LSTMLMConfig) -> None:
        super().__init__(config)
        self.encoder = nn.Embedding(config.vocab_size, config.emsize)
        self.drop = nn.Dropout(config.dropout)
        rnn_kwargs = {}
        if config.rnn_type.startswith("RNN_"):
            rnn_kwargs["nonlinearity"] = "relu" if config.rnn_type == "RNN_RELU" else "tanh"
        self.rnn = _RNN_CLASSES[config.rnn_type](
            config.emsize, config.nhid, config.nlayers,
            dropout=config.dropout if config.nlayers > 1 else 0.0, batch_first=True, **rnn_kwargs,
        )
        self.lm_head = nn.Linear(config.nhid, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def init_state(self, batch_size: int) -> LSTMState:
        """An all-zero state for `batch_size` sequences (what forward uses when given none)."""
        ref = next(self.rnn.parameters())
        shape = (self.config.nlayers, batch_size, self.config.nhid)
        h = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        return LSTMState(h, torch.zeros_like(h) if self.config.rnn_type == "LSTM" else None)

    def _run_masked(self, x: torch.Tensor, state: LSTMState | None, mask: torch.Tensor):
        """The RNN one step at a time, keeping the old state where mask == 0. x: (B, T, emsize), mask: (B, T)."""
        state = state or self.init_state(x.shape[0])
        outputs = []
        for t in range(x.shape[1]):
            out, hx = self.rnn(x[:, t : t + 1], state.hx)
            new = LSTMState.from_rnn(hx)
            keep = mask[:, t].to(torch.bool).view(1, -1, 1)  # (1, B, 1)
            state = LSTMState(
                torch.where(keep, new.h, state.h), None if new.c is None else torch.where(keep, new.c, state.c)
            )
            outputs.append(out)
        return torch.cat(outputs, dim=1), state

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: LSTMState | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        state = past_key_values if past_key_values is not None else kwargs.pop("cache", None)  # 5.24+ name
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")

        x = self.drop(self.encoder(input_ids) if inputs_embeds is None else inputs_embeds)  # (B, T, emsize)
        if attention_mask is not None and not bool(attention_mask.all()):
            out, state = self._run_masked(x, state, attention_mask)
        else:
            out, hx = self.rnn(x, None if state is None else state.hx)  # out: (B, T, nhid)
            state = LSTMState.from_rnn(hx)
        hidden = self.drop(out)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)  # (B, T, V)

        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        state = state if use_cache else None
        if not return_dict:
            output = (logits, state) if use_cache else (logits,)
            return (loss, *output) if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{STATE_FIELD: state})

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: LSTMState | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> dict:
        """First step: the whole prompt. Then, once a state exists, only the newest token: the state holds the rest."""
        state = past_key_values if past_key_values is not None else kwargs.get("cache")
        inputs = {"use_cache": use_cache}
        if state is not None and use_cache is not False:
            inputs.update(input_ids=input_ids[:, -1:], past_key_values=state)
        else:
            inputs.update(input_ids=input_ids, attention_mask=attention_mask)
        return inputs

    def _reorder_cache(self, state: LSTMState, beam_idx: torch.Tensor) -> LSTMState:
        """Beam search: keep the states of the surviving beams."""
        return state.index_select(beam_idx)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The cache is an LSTMState the model creates itself, not an attention DynamicCache.
        return False


__all__ = ["LSTMLMForCausalLM", "LSTMLMPreTrainedModel", "LSTMState", "STATE_FIELD"]
