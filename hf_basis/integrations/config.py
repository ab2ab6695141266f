"""BasisConfig: the `quantization_config` that transformers writes into config.json for an hf_basis model.

It is registered with transformers as quant_method "hf_basis" (on `import hf_basis`), so that

    AutoModelForCausalLM.from_pretrained(compressed_dir)                                   # rebuilds the shells
    AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=BasisConfig(...))  # compresses on load

both go through `HfBasisQuantizer`. A config saved with a checkpoint also holds `layers`: per compressed module its
role, kind, shape and tie, i.e. everything needed to rebuild the compressed modules with the exact saved shapes
before any weight is read. A config a user builds to compress while loading has `layers=None`.
"""

from __future__ import annotations

import math
from typing import Any

from transformers.quantizers import register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_basis.validation import ALLOWED_NBITS, check_basis_shape, is_int

__all__ = ["BasisConfig", "FORMAT_VERSION", "QUANT_METHOD"]

QUANT_METHOD = "hf_basis"
# Bumped when the checkpoint layout changes; a checkpoint with a newer format is refused with a clear error.
FORMAT_VERSION = 1

METHODS = ("basis", "quant")
# "embeddings": every plain nn.Embedding of the model, as `hf_basis.quantize_embed` compresses them (method="quant").
LAYER_CHOICES = ("both", "input", "output")  # the layers convert() / PQ-aware training take
MODULE_CHOICES = (*LAYER_CHOICES, "embeddings")  # the record also knows quantize_embed's
KINDS = {
    # method -> role -> module class name ("embedding": an nn.Embedding other than the input one, quantize_embed)
    "basis": {"input": "BasisEmbedding", "output": "BasisLinear"},
    "quant": {"input": "QuantEmbedding", "output": "QuantLinear", "embedding": "QuantEmbedding"},
}
_LAYER_KEYS = ("role", "kind", "aliases", "shape", "dense_dtype", "relative_error", "tied_to")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf_basis")
    except PackageNotFoundError:  # running from a source tree
        return "0.1.0"


class BasisConfig(QuantizationConfigMixin):
    """Settings of an hf_basis compression, as stored under `quantization_config` in config.json.

    Args:
        method: "basis" (product quantization: integer codes + trainable centroids) or "quant" (clipped uniform
            quantization: packed integers + a level table).
        num_basis: method="basis": sub-vectors per word, B (default 8). Must divide the hidden size.
        num_clusters: method="basis": centroids per sub-space, K (default 256), 2 .. min(vocab, 32768).
        nbit: method="quant": bits per value (default 4), one of 1, 2, 4, 8, 16, 32.
        modules: "both", "input" (embedding only), "output" (lm_head only), or "embeddings" (method="quant": every
            plain nn.Embedding, what `hf_basis.quantize_embed` compresses).
        tied: whether the compressed input and output layers share one table (set from the model; None when the
            config only describes how to compress a dense checkpoint).
        seed: k-means++ / stochastic-rounding seed used by `hf_basis.convert` (None: unseeded stochastic rounding of
            `quantize_embed`).
        stochastic_round: method="quant": stochastic rounding when compressing.
        layers: {module name: {role, kind, aliases, shape, dense_dtype, relative_error, tied_to}} as recorded by
            `hf_basis.convert` in `model.hf_basis_config["layers"]`; None for a config that compresses on load.
        token_frequency_weighted: method="basis": the k-means was weighted by token frequencies
            (`hf_basis.convert(..., token_frequencies=...)`); informational, loading does not need the frequencies.
        activation_aware: method="basis": the output layer's codebook was fitted to the logit error
            (`hf_basis.convert(..., head_input_moment=...)`); informational.
        format_version: checkpoint layout version (written by hf_basis; leave the default).
        **kwargs: ignored (forward compatibility with configs written by newer versions).

    Every attribute is plain JSON (transformers serialises `__dict__`).
    """

    def __init__(
        self,
        method: str = "basis",
        num_basis: int | None = None,
        num_clusters: int | None = None,
        nbit: int | None = None,
        modules: str = "both",
        tied: bool | None = None,
        seed: int = 0,
        stochastic_round: bool | None = None,
        layers: dict[str, dict[str, Any]] | None = None,
        token_frequency_weighted: bool = False,
        activation_aware: bool = False,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.method = method
        if method == "basis":
            num_basis = 8 if num_basis is None else num_basis
            num_clusters = 256 if num_clusters is None else num_clusters
        elif method == "quant":
            nbit = 4 if nbit is None else nbit
            stochastic_round = bool(stochastic_round)
        self.num_basis = num_basis
        self.num_clusters = num_clusters
        self.nbit = nbit
        self.modules = modules
        self.tied = tied
        self.seed = seed
        self.stochastic_round = stochastic_round
        self.token_frequency_weighted = bool(token_frequency_weighted)
        self.activation_aware = bool(activation_aware)
        self.layers = None if layers is None else {str(k): _clean_layer(v) for k, v in dict(layers).items()}
        self.format_version = format_version
        self.hf_basis_version = kwargs.pop("hf_basis_version", None) or _version()
        kwargs.pop("quant_method", None)
        self.post_init()

    # ------------------------------------------------------------------ validation
    def post_init(self) -> None:
        """Check every field; raise ValueError naming the field and the allowed values."""
        if self.method not in METHODS:
            raise ValueError(f"BasisConfig: method must be one of {list(METHODS)}, got {self.method!r}")
        if self.modules not in MODULE_CHOICES:
            raise ValueError(f"BasisConfig: modules must be one of {list(MODULE_CHOICES)}, got {self.modules!r}")
        if self.method == "basis":
            if self.nbit is not None:
                raise ValueError("BasisConfig: nbit applies to method='quant' only; leave it unset for method='basis'")
            if not is_int(self.num_basis) or self.num_basis < 1:
                raise ValueError(f"BasisConfig: num_basis must be a positive integer, got {self.num_basis!r}")
            if not is_int(self.num_clusters) or not 2 <= self.num_clusters <= 32768:
                raise ValueError(
                    f"BasisConfig: num_clusters must be an integer in [2, 32768], got {self.num_clusters!r}"
                )
        else:
            if self.num_basis is not None or self.num_clusters is not None:
                raise ValueError(
                    "BasisConfig: num_basis / num_clusters apply to method='basis' only; leave them unset for "
                    "method='quant' (use nbit)"
                )
            if not is_int(self.nbit) or self.nbit not in ALLOWED_NBITS:
                raise ValueError(f"BasisConfig: nbit must be one of {list(ALLOWED_NBITS)}, got {self.nbit!r}")
        if self.tied is not None and not isinstance(self.tied, bool):
            raise ValueError(f"BasisConfig: tied must be true, false or null, got {self.tied!r}")
        if self.modules == "embeddings" and self.method != "quant":
            raise ValueError("BasisConfig: modules='embeddings' (quantize_embed) applies to method='quant' only")
        if not (is_int(self.seed) or (self.seed is None and self.method == "quant")):
            raise ValueError(f"BasisConfig: seed must be an integer, got {self.seed!r}")
        if not is_int(self.format_version) or self.format_version < 1:
            raise ValueError(f"BasisConfig: format_version must be a positive integer, got {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint was written in hf_basis format {self.format_version} (hf_basis "
                f"{self.hf_basis_version}), but the installed hf_basis reads formats up to {FORMAT_VERSION}: "
                "upgrade hf_basis (install a newer version from its source)"
            )
        if self.layers is not None:
            self._check_layers()

    def _check_layers(self) -> None:
        if not isinstance(self.layers, dict) or not self.layers:
            raise ValueError("BasisConfig: layers must be a non-empty mapping {module name: layer description}")
        roles = {}
        for name, layer in self.layers.items():
            where = f"BasisConfig.layers[{name!r}]"
            missing = [k for k in ("role", "kind", "shape") if k not in layer]
            if missing:
                raise ValueError(f"{where} lacks {missing}")
            role, kind, shape = layer["role"], layer["kind"], layer["shape"]
            allowed_roles = ("input", "embedding") if self.modules == "embeddings" else ("input", "output")
            if role not in allowed_roles:
                raise ValueError(
                    f"{where}: role must be one of {list(allowed_roles)} for modules={self.modules!r}, got {role!r}"
                )
            if role in roles and role != "embedding":
                raise ValueError(f"{where}: two layers have role {role!r} ({roles[role]!r} and {name!r})")
            roles.setdefault(role, name)
            expected_kind = KINDS[self.method][role]
            if kind != expected_kind:
                raise ValueError(
                    f"{where}: kind {kind!r} does not match method={self.method!r} and role={role!r} "
                    f"(expected {expected_kind!r})"
                )
            if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(is_int(s) and s > 0 for s in shape)):
                raise ValueError(f"{where}: shape must be [num_embeddings, embedding_dim], got {shape!r}")
            if self.method == "basis":
                try:
                    check_basis_shape(shape[0], shape[1], self.num_basis, self.num_clusters)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
            if not isinstance(layer.get("aliases", []), list):
                raise ValueError(f"{where}: aliases must be a list of module names")
        wanted = {"both": {"input", "output"}, "input": {"input"}, "output": {"output"}}.get(self.modules)
        if wanted is not None and set(roles) != wanted:
            raise ValueError(
                f"BasisConfig: modules={self.modules!r} needs layers with roles {sorted(wanted)}, "
                f"but layers has {sorted(roles)}"
            )
        out = self.layers.get(roles.get("output"), {})
        tied_to = out.get("tied_to")
        if tied_to is not None and tied_to != roles.get("input"):
            raise ValueError(
                f"BasisConfig: the output layer is tied to {tied_to!r}, which is not the compressed input layer "
                f"{roles.get('input')!r}"
            )
        if tied_to is not None and tuple(out["shape"]) != tuple(self.layers[tied_to]["shape"]):
            raise ValueError("BasisConfig: tied input and output layers must have the same shape")
        if self.tied is not None and self.tied != (tied_to is not None):
            raise ValueError(f"BasisConfig: tied={self.tied} disagrees with layers (output tied_to={tied_to!r})")

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_hf_basis_config(cls, hf_basis_config: dict[str, Any]) -> BasisConfig:
        """Build the config from `model.hf_basis_config` (what `hf_basis.convert` records)."""
        return cls(**{k: v for k, v in hf_basis_config.items() if k != "quant_method"})

    def to_hf_basis_config(self) -> dict[str, Any]:
        """The inverse: the dict `hf_basis.convert` records as `model.hf_basis_config`."""
        return {
            "method": self.method,
            "num_basis": self.num_basis,
            "num_clusters": self.num_clusters,
            "nbit": self.nbit,
            "modules": self.modules,
            "seed": self.seed,
            "stochastic_round": self.stochastic_round,
            "tied": self.tied,
            "token_frequency_weighted": self.token_frequency_weighted,
            "activation_aware": self.activation_aware,
            "layers": None if self.layers is None else {k: dict(v) for k, v in self.layers.items()},
        }

    def convert_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `hf_basis.convert(model, **kwargs)` that reproduce these settings."""
        kwargs: dict[str, Any] = {"method": self.method, "modules": self.modules, "seed": self.seed}
        if self.method == "basis":
            kwargs.update(num_basis=self.num_basis, num_clusters=self.num_clusters)
        else:
            kwargs.update(nbit=self.nbit, stochastic_round=bool(self.stochastic_round))
        return kwargs

    def settings(self) -> str:
        """One line describing the compression, e.g. 'basis, 8 x 256 (num_basis x num_clusters), both, tied'."""
        if self.method == "basis":
            what = f"product quantization, num_basis={self.num_basis}, num_clusters={self.num_clusters}"
        else:
            what = f"clipped uniform quantization, nbit={self.nbit}"
        tie = "" if self.tied is None else (", tied" if self.tied else ", untied")
        return f"{what}, modules={self.modules}{tie}"


def _clean_layer(layer: dict[str, Any]) -> dict[str, Any]:
    """A JSON-clean copy of one layer description (NaN errors become null, tuples lists)."""
    if not isinstance(layer, dict):
        raise ValueError(f"BasisConfig: each entry of layers must be a mapping, got {type(layer).__name__}")
    out = {k: layer[k] for k in _LAYER_KEYS if k in layer}
    out.update({k: v for k, v in layer.items() if k not in out})
    if "shape" in out and isinstance(out["shape"], tuple):
        out["shape"] = list(out["shape"])
    out.setdefault("aliases", [])
    out.setdefault("tied_to", None)
    err = out.get("relative_error")
    if isinstance(err, float) and not math.isfinite(err):
        out["relative_error"] = None
    return out


def register() -> None:
    """Register BasisConfig as quant_method "hf_basis" (idempotent: re-importing hf_basis is fine)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        if AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD].__name__ != BasisConfig.__name__:
            raise ValueError(f"another quantization config is already registered as {QUANT_METHOD!r}")
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = BasisConfig
    else:
        register_quantization_config(QUANT_METHOD)(BasisConfig)
