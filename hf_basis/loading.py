"""Load a checkpoint with the model class its config names, for the CLI and the healing recipe."""

from __future__ import annotations

from typing import Any

import transformers

__all__ = ["NoModelClass", "load_model"]


class NoModelClass(ValueError):
    """None of the classes tried accepts the checkpoint's config."""


def load_model(path: str, config: transformers.PretrainedConfig, autos: tuple[str, ...] = ("AutoModel",),
               **kwargs: Any) -> transformers.PreTrainedModel:
    """The model at `path` as the class its config's `architectures` names (an hf_basis checkpoint loads compressed
    through the registered quantizer), else as the first of the Auto classes `autos` that accepts the config.
    `kwargs` go to `from_pretrained`."""
    import hf_basis  # noqa: F401  (registers the "hf_basis" quantization method)

    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls.from_pretrained(path, **kwargs)
    errors = []
    for auto in autos:
        try:
            return getattr(transformers, auto).from_pretrained(path, **kwargs)
        except ValueError as err:  # "Unrecognized configuration class ... for this kind of AutoModel"
            errors.append(f"{auto}: {err}")
    raise NoModelClass(f"cannot find a model class for {path}: " + "; ".join(errors))
