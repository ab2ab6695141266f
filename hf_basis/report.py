"""`report(model)`: what hf_basis swapped, and what it saved, as a table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from hf_basis.integrations.record import COMPRESSED_MODULES, get_record

__all__ = ["CompressionReport", "LayerReport", "report"]


@dataclass
class LayerReport:
    """One compressed module. Bytes count stored tensors (codes, centroids, packed values, level tables, bias)."""

    name: str
    kind: str
    shape: tuple[int, int]
    params_before: int
    bytes_before: int
    params_after: int
    bytes_after: int
    relative_error: float | None
    tied_to: str | None

    @property
    def ratio(self) -> float | None:
        return self.bytes_before / self.bytes_after if self.bytes_after else None


@dataclass
class CompressionReport:
    layers: list[LayerReport]

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(layer) | {"ratio": layer.ratio} for layer in self.layers],
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "compression_ratio": self.compression_ratio,
        }

    def __str__(self) -> str:
        header = ("module", "kind", "shape", "params before", "bytes before", "params after", "bytes after", "ratio",
                  "rel. error")
        rows = [header]
        for layer in self.layers:
            rows.append((
                layer.name,
                layer.kind + (f" (tied to {layer.tied_to})" if layer.tied_to else ""),
                f"{layer.shape[0]} x {layer.shape[1]}",
                f"{layer.params_before:,}",
                _human(layer.bytes_before),
                f"{layer.params_after:,}",
                _human(layer.bytes_after),
                "shared" if layer.tied_to else f"{layer.ratio:.1f}x",
                "-" if layer.relative_error is None else f"{layer.relative_error:.4f}",
            ))
        rows.append(("total", "", "", f"{sum(r.params_before for r in self.layers):,}", _human(self.bytes_before),
                     f"{sum(r.params_after for r in self.layers):,}", _human(self.bytes_after),
                     f"{self.compression_ratio:.1f}x", ""))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _dense_element_size(module: nn.Module, recorded_dtype: str | None) -> int:
    """Bytes per element of the dense matrix the module replaced: as recorded by convert(), else its float dtype."""
    if recorded_dtype is not None:
        dtype = getattr(torch, recorded_dtype)
    elif hasattr(module, "codebook"):
        dtype = module.codebook.centroids.dtype
    else:
        dtype = getattr(module, "output_dtype", torch.float32)
    return torch.empty((), dtype=dtype).element_size()


def report(model: nn.Module) -> CompressionReport:
    """Describe every compressed module of `model`: shape, parameters and bytes before/after, ratio, error.

    "Before" is the dense layer hf_basis replaced (weight in the dtype it had, plus bias); "after" is what is
    stored now. A tied output layer counts nothing extra on either side: the tie stored one matrix before and
    one codebook after. Works on converted models and on compressed models loaded from disk
    (relative errors come from `model.hf_basis_config` when the conversion happened in this process).
    """
    recorded = (get_record(model) or {}).get("layers", {})
    seen: dict[int, str] = {}  # id(shared storage module) -> name of the first layer that holds it
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, COMPRESSED_MODULES):
            continue
        storage = module.codebook if hasattr(module, "codebook") else module.table
        V, D = storage.num_embeddings, storage.embedding_dim
        dense_bytes = _dense_element_size(module, recorded.get(name, {}).get("dense_dtype"))
        bias = getattr(module, "bias", None)
        bias_params = 0 if bias is None else bias.numel()
        bias_bytes = 0 if bias is None else bias.numel() * bias.element_size()
        tied_to = seen.get(id(storage))
        seen.setdefault(id(storage), name)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if tied_to is None:
            before_params, before_bytes = V * D + bias_params, V * D * dense_bytes + bias_bytes
            after_bytes = storage.nbytes() + bias_bytes
        else:
            before_params, before_bytes = bias_params, bias_bytes
            after_bytes = bias_bytes
            trainable = bias_params if (bias is not None and bias.requires_grad) else 0
        error = recorded.get(name, {}).get("relative_error")
        layers.append(LayerReport(name, type(module).__name__, (V, D), before_params, before_bytes, trainable,
                                  after_bytes, error, tied_to))
    if not layers:
        raise ValueError("the model holds no hf_basis module: call hf_basis.convert(model, ...) first")
    return CompressionReport(layers)
