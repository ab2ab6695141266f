"""transformers / Hub integration: the "hf_basis" quantization method (BasisConfig + HfBasisQuantizer), saving,
the model card and pushing. Importing this package registers the quantization method with transformers."""

from hf_basis.integrations import config as _config
from hf_basis.integrations import quantizer as _quantizer
from hf_basis.integrations.config import BasisConfig
from hf_basis.integrations.quantizer import CheckpointMismatchError, HfBasisQuantizer
from hf_basis.integrations.serialization import attach_quantization_config

_config.register()
_quantizer.register()

__all__ = ["BasisConfig", "CheckpointMismatchError", "HfBasisQuantizer", "attach_quantization_config"]
