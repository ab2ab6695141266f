"""hf_basis: compressed input embeddings and lm_head for HuggingFace transformers.

    import hf_basis
    model = hf_basis.convert(model, num_basis=8)          # product-quantized embedding + lm_head
    print(hf_basis.report(model))
"""

from hf_basis.calibration import head_input_moment
from hf_basis.convert import convert, quantize_embed
from hf_basis.modules.basis_embedding import BasisEmbedding
from hf_basis.modules.basis_linear import BasisLinear
from hf_basis.modules.codebook import Codebook
from hf_basis.models.lstm import LSTMLMConfig, LSTMLMForCausalLM
from hf_basis.modules.quant_embedding import QuantEmbedding, QuantLinear
from hf_basis.ops import basis_cross_entropy
from hf_basis.pq_aware_training import PQAwareTrainingCallback, prepare_pq_aware_training
from hf_basis.report import report

__version__ = "0.1.0"

__all__ = [
    "BasisConfig",
    "BasisEmbedding",
    "BasisLinear",
    "Codebook",
    "DistillationTrainer",
    "LSTMLMConfig",
    "LSTMLMForCausalLM",
    "PQAwareTrainingCallback",
    "QuantEmbedding",
    "QuantLinear",
    "basis_cross_entropy",
    "convert",
    "head_input_moment",
    "prepare_pq_aware_training",
    "quantize_embed",
    "report",
]

from hf_basis.integrations import BasisConfig  # noqa: E402  (registers quant_method "hf_basis" with transformers)
from hf_basis.integrations.distillation import DistillationTrainer  # noqa: E402
