"""The word-level LSTM language model, registered with AutoConfig / AutoModelForCausalLM as model_type "lstm_lm"."""

from transformers import AutoConfig, AutoModelForCausalLM

from hf_basis.models.lstm.configuration_lstm import LSTMLMConfig
from hf_basis.models.lstm.modeling_lstm import STATE_FIELD, LSTMLMForCausalLM, LSTMLMPreTrainedModel, LSTMState

AutoConfig.register(LSTMLMConfig.model_type, LSTMLMConfig, exist_ok=True)
AutoModelForCausalLM.register(LSTMLMConfig, LSTMLMForCausalLM, exist_ok=True)

__all__ = ["LSTMLMConfig", "LSTMLMForCausalLM", "LSTMLMPreTrainedModel", "LSTMState", "STATE_FIELD"]
