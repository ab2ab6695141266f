"""LSTMLMConfig: the configuration of the recurrent word-level language model (PyTorch's word_language_model)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

RNN_TYPES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


@strict
class LSTMLMConfig(PreTrainedConfig):
    r"""Configuration of [`LSTMLMForCausalLM`]: embedding -> dropout -> multi-layer RNN -> dropout -> linear head.

    The defaults are the Penn Treebank setting of Shi & Yu (2018) and of PyTorch's word_language_model example
    (emsize = nhid = 200, 2 layers, dropout 0.2).

    Args:
        vocab_size (`int`, defaults to 10000): V, rows of the input embedding and of the output layer.
        emsize (`int`, defaults to 200): width of the input embedding.
        nhid (`int`, defaults to 200): hidden units per RNN layer (the output layer is nhid -> V).
        nlayers (`int`, defaults to 2): stacked RNN layers.
        rnn_type (`str`, defaults to `"LSTM"`): one of "LSTM", "GRU", "RNN_TANH", "RNN_RELU".
        dropout (`float`, defaults to 0.2): dropout on the embeddings, between RNN layers and before the head.
        init_range (`float`, defaults to 0.1): embedding and head weights start U(-init_range, init_range), the head
            bias at 0, the RNN as PyTorch initialises it (word_language_model's scheme).
        tie_word_embeddings (`bool`, defaults to False): share the embedding matrix with the head
            (Press & Wolf 2017); requires emsize == nhid.
        use_cache (`bool`, defaults to True): return the recurrent state (the model's cache) from forward.
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special token ids (the word-level tokenizers of
            the recipes have `<unk>` = 0 and `<eos>` = 1 and no padding or BOS token).

    Example:

    ```python
    >>> import hf_basis
    >>> config = hf_basis.LSTMLMConfig(vocab_size=10000, emsize=200, nhid=200, nlayers=2)
    >>> model = hf_basis.LSTMLMForCausalLM(config)
    ```
    """

    model_type = "lstm_lm"
    # The recurrent state is not a prediction: the Trainer must not gather it during evaluation. transformers calls
    # the cache field `past_key_values` up to 5.23 and `cache` from 5.24.
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 10000
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 2
    rnn_type: str = "LSTM"
    dropout: float = 0.2
    init_range: float = 0.1
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        self._check()  # plain ValueError at construction (strict validation would wrap it)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation (`config.validate()`, e.g. after changing a field)."""
        super().validate_architecture()
        self._check()

    def _check(self) -> None:
        if self.rnn_type not in RNN_TYPES:
            raise ValueError(f"rnn_type must be one of {list(RNN_TYPES)}, got {self.rnn_type!r}")
        for name in ("vocab_size", "emsize", "nhid", "nlayers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tie_word_embeddings and self.emsize != self.nhid:
            raise ValueError(
                f"tie_word_embeddings=True shares one V x d matrix between the embedding and the head, so it needs "
                f"emsize == nhid; got emsize={self.emsize}, nhid={self.nhid}"
            )


__all__ = ["LSTMLMConfig", "RNN_TYPES"]
