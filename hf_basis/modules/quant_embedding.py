"""SmallFry modules: frozen clipped-uniform-quantized embedding table, embedding layer and output layer.

QuantizedTable holds the bit-packed (V, D) matrix; QuantEmbedding looks rows up in it, QuantLinear multiplies by it
(lm_head). A model with tied input/output embeddings gives both layers the SAME QuantizedTable object. Nothing here
has Parameters: the table is for inference or frozen-embedding training only (train with BasisEmbedding instead).

Dtypes: the level table stays float32 whatever `.half()` / `.to(dtype)` ask (16-bit levels do not fit fp16
exactly); QuantEmbedding's output dtype is a plain attribute, `output_dtype`, that those calls update.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hf_basis.compress.packing import pack_bits, packed_nbytes
from hf_basis.compress.uniform import nearest_levels, quantize_matrix
from hf_basis.modules.decoded_weight import DecodedWeight
from hf_basis.modules.resize import resize_bias_
from hf_basis.ops.embedding_max_norm import renorm_rows
from hf_basis.ops.quant_lookup import OUT_DTYPES, quant_lookup
from hf_basis.validation import check_nbit, check_resize

__all__ = ["QuantEmbedding", "QuantLinear", "QuantizedTable"]

# QuantLinear dequantizes this many weight elements at a time (32 MiB in fp16), so its scratch memory does not
# grow with the vocabulary.
_LINEAR_CHUNK_ELEMENTS = 1 << 24


def _check_output_dtype(dtype: torch.dtype, name: str = "dtype") -> None:
    if dtype not in OUT_DTYPES:
        hint = (": the quantized table holds float32 values, so a float64 model would silently lose precision; "
                "quantize a float32 copy (model.float())") if dtype == torch.float64 else ""
        raise ValueError(f"{name} must be one of {list(OUT_DTYPES)}, got {dtype}{hint}")


class QuantizedTable(nn.Module):
    """A frozen V x D matrix stored as bit-packed level indices plus a level table (SmallFry).

    Row w is `levels[unpack(packed[w])]` (for nbit = 32, the packed bytes are the float32 values themselves).

    Args:
        num_embeddings: V, the number of rows.
        embedding_dim: D, the row width.
        nbit: bits per value, one of 1, 2, 4, 8, 16, 32.
        device: where the (zero-initialised) buffers live; `from_weight` fills them, or `load_state_dict` does.

    Attributes:
        packed: (V, ceil(D * nbit / 8)) uint8 persistent buffer, layout of `hf_basis.compress.packing`.
        levels: (2^nbit,) float32 persistent buffer ((0,) for nbit = 32); stays float32 under `.half()` etc.
        clip: the clip threshold r, or None (values stored exactly, nbit = 32, or loaded from a state dict).
        relative_error: ||W - W_q||_F / ||W||_F measured by `from_weight`; None when loaded from a state dict.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, nbit: int, *, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        check_nbit(nbit)
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.nbit = nbit
        self.clip: float | None = None
        self.relative_error: float | None = None
        nbytes = packed_nbytes(embedding_dim, nbit)
        self.register_buffer("packed", torch.zeros(num_embeddings, nbytes, dtype=torch.uint8, device=device))
        num_levels = 0 if nbit == 32 else 2**nbit
        self.register_buffer("levels", torch.zeros(num_levels, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, nbit: int, *, stochastic_round: bool = False, seed: int | None = None
    ) -> QuantizedTable:
        """Quantize a (V, D) floating matrix with `hf_basis.compress.uniform.quantize_matrix`, on its device.

        Costs a few float32 copies of the matrix (the search, the sort that counts distinct values, the error).
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be a (num_embeddings, embedding_dim) matrix, got {tuple(weight.shape)}")
        quantized = quantize_matrix(weight, nbit, stochastic=stochastic_round, seed=seed)
        table = cls(weight.shape[0], weight.shape[1], nbit, device=weight.device)
        table.packed = pack_bits(quantized.indices, nbit)
        table.levels = quantized.levels
        table.clip = quantized.clip
        w = weight.detach().float()
        norm = float(torch.linalg.vector_norm(w))
        diff = float(torch.linalg.vector_norm(w - table.dequantize(torch.float32)))
        table.relative_error = diff / norm if norm > 0 else 0.0
        return table

    def lookup(self, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `indices` (...) -> (..., D) in `dtype`."""
        return quant_lookup(self.packed, self.levels, indices, self.nbit, self.embedding_dim, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (V, D) matrix in `dtype` (O(V * D) time and memory)."""
        return self.lookup(torch.arange(self.num_embeddings, device=self.packed.device), dtype)

    def resize_(self, num_embeddings: int, new_rows: torch.Tensor | None = None) -> None:
        """Keep the first `num_embeddings` rows, or append `new_rows` (num_embeddings - V, D), each value stored as
        its nearest existing level (the level table does not change). In place, so shared (tied) users follow."""
        check_resize(num_embeddings, 1, self.num_embeddings, self.embedding_dim, new_rows)
        packed = self.packed[:num_embeddings]
        if new_rows is not None and len(new_rows):
            packed = torch.cat([packed, pack_bits(nearest_levels(new_rows, self.levels, self.nbit), self.nbit)])
        self.packed = packed.contiguous()
        self.num_embeddings = num_embeddings

    def nbytes(self) -> int:
        """Bytes of storage: the packed indices plus the level table."""
        return self.packed.numel() * self.packed.element_size() + self.levels.numel() * self.levels.element_size()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedTable:
        # Hand `fn` the levels as int32 bits: `.half()` / `.to(dtype)` leave integer tensors alone but still move
        # them across devices, so the levels keep their exact float32 values.
        levels = self._buffers["levels"]

        def keep_levels_float32(t: torch.Tensor) -> torch.Tensor:
            if t is not levels:
                return fn(t)
            bits = fn(t.view(torch.int32))
            if bits.dtype != torch.int32:
                raise TypeError(f"QuantizedTable keeps its levels float32; cannot convert them to {bits.dtype}")
            return bits.view(torch.float32)

        return super()._apply(keep_levels_float32, recurse)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # nn.Module would silently cast a float `packed` to uint8; reject wrong dtypes and shapes with the layout.
        valid = True
        for name, buffer in (("packed", self.packed), ("levels", self.levels)):
            key = prefix + name
            if key in state_dict:
                given = state_dict[key]
                if given.dtype != buffer.dtype or given.shape != buffer.shape:
                    error_msgs.append(
                        f"{key}: a QuantizedTable(num_embeddings={self.num_embeddings}, "
                        f"embedding_dim={self.embedding_dim}, nbit={self.nbit}) expects {buffer.dtype} of shape "
                        f"{tuple(buffer.shape)}, got {given.dtype} of shape {tuple(given.shape)}"
                    )
                    valid = False
        if valid:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )

    def extra_repr(self) -> str:
        clip = f", clip={self.clip:.4g}" if self.clip is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, nbit={self.nbit}{clip}"


class _Frozen(nn.Module):
    """Refuses `requires_grad_(True)`: the quantized table has no trainable values."""

    def requires_grad_(self, requires_grad: bool = True) -> _Frozen:
        if requires_grad:
            raise RuntimeError(
                f"{type(self).__name__} is frozen (inference / frozen-embedding use only): its quantized table "
                "has no parameters to train. Use BasisEmbedding / BasisLinear to train a compressed embedding."
            )
        return self


def _read_glove(path: str | os.PathLike, num_embeddings: int, embedding_dim: int) -> torch.Tensor:
    """GloVe text (`word v1 ... vd` per line, single spaces, no header) -> float32 (V, D); line i -> row i.

    Blank lines are skipped; fewer lines than V leave the remaining rows zero (with a warning).
    """
    weight = torch.zeros(num_embeddings, embedding_dim, dtype=torch.float32)
    row = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.rstrip().split(" ")
            if fields == [""]:
                continue
            if len(fields) != embedding_dim + 1:
                raise ValueError(
                    f"{path}, line {lineno}: expected a word and embedding_dim={embedding_dim} values, "
                    f"got {len(fields) - 1} values"
                )
            if row == num_embeddings:
                raise ValueError(f"{path} has more than num_embeddings={num_embeddings} rows (line {lineno})")
            try:
                weight[row] = torch.tensor([float(v) for v in fields[1:]])
            except ValueError as err:
                raise ValueError(f"{path}, line {lineno}: {err}") from None
            row += 1
    if row < num_embeddings:
        warnings.warn(
            f"{path} has {row} rows for num_embeddings={num_embeddings}; rows {row}..{num_embeddings - 1} are zero",
            stacklevel=3,
        )
    return weight


class QuantEmbedding(_Frozen):
    """Frozen embedding over a clipped-uniform-quantized table (SmallFry `QuantEmbedding`, same signature).

    Args:
        num_embeddings, embedding_dim: V and D.
        padding_idx: the padding token's id (negative counts from the end), kept for interoperability: as in
            nn.Embedding it only means "no gradient", which a frozen table never has, so its row is returned as stored.
        max_norm, norm_type: nn.Embedding's: looked-up rows of p-norm above max_norm are returned scaled down to it
            (`hf_basis.ops.embedding_max_norm`; the frozen table is not rewritten).
        scale_grad_by_freq, sparse: nn.Embedding's gradient options; must be False (the table has no gradient).
        _weight: (V, D) floating matrix to quantize.
        nbit: bits per value, one of 1, 2, 4, 8, 16, 32 (32: float32 stored as is, no quantization).
        embedding_file: GloVe text file (`word v1 ... vd` per line, no header) whose line i becomes row i.
        stochastic_round: stochastic instead of deterministic rounding; `seed` makes it reproducible.
        device: where the table is built (default: _weight's device, CPU for a file).
        dtype: output dtype, fp32 / fp16 / bf16 (default: _weight's dtype, else fp32).
        table: an existing QuantizedTable, used as is (shared, not copied); nbit / stochastic_round / seed are then
            the table's and these arguments are ignored.

    Exactly one of `_weight`, `embedding_file`, `table` must be given.

    Input (...) int64/int32 token ids -> output (..., D) in `output_dtype`, which `.half()`, `.bfloat16()`,
    `.float()` and `.to(dtype)` update. Ids outside [0, V) raise IndexError (a device-side assert on CUDA).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: torch.Tensor | None = None,
        nbit: int = 32,
        embedding_file: str | os.PathLike | None = None,
        *,
        stochastic_round: bool = False,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        table: QuantizedTable | None = None,
    ) -> None:
        super().__init__()
        check_nbit(nbit)
        if scale_grad_by_freq or sparse:
            raise ValueError("QuantEmbedding has no gradients: scale_grad_by_freq and sparse must be False")
        given = [name for name, v in (("_weight", _weight), ("embedding_file", embedding_file), ("table", table))
                 if v is not None]  # fmt: skip
        if len(given) != 1:
            raise ValueError(f"give exactly one of _weight, embedding_file or table; got {given or 'none'}")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx %= num_embeddings
        if dtype is not None:
            _check_output_dtype(dtype)

        if table is not None:
            if not isinstance(table, QuantizedTable):
                raise TypeError(f"table must be a QuantizedTable, got {type(table).__name__}")
            out_dtype = dtype or torch.float32
        elif _weight is not None:
            if tuple(_weight.shape) != (num_embeddings, embedding_dim):
                raise ValueError(
                    f"_weight must have shape (num_embeddings, embedding_dim) = ({num_embeddings}, {embedding_dim}), "
                    f"got {tuple(_weight.shape)}"
                )
            out_dtype = dtype or _weight.dtype
            _check_output_dtype(out_dtype, "_weight.dtype")
            weight = _weight.detach() if device is None else _weight.detach().to(device)
            table = QuantizedTable.from_weight(weight, nbit, stochastic_round=stochastic_round, seed=seed)
        else:
            weight = _read_glove(embedding_file, num_embeddings, embedding_dim).to(device)
            out_dtype = dtype or torch.float32
            table = QuantizedTable.from_weight(weight, nbit, stochastic_round=stochastic_round, seed=seed)
        if (table.num_embeddings, table.embedding_dim) != (num_embeddings, embedding_dim):
            raise ValueError(
                f"table is {table.num_embeddings} x {table.embedding_dim}, but num_embeddings x embedding_dim is "
                f"{num_embeddings} x {embedding_dim}"
            )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.output_dtype = out_dtype
        self.table = table

    @property
    def nbit(self) -> int:
        return self.table.nbit

    @property
    def weight(self) -> DecodedWeight:
        """Read-only dense (V, D) matrix in `output_dtype`; rebuilt on every access, O(V * D).

        In-place writes raise; `weight.requires_grad` is False and setting it True raises (see DecodedWeight).
        """
        ids = torch.arange(self.num_embeddings, device=self.table.packed.device)
        return DecodedWeight.wrap(self.table.lookup(ids, self.output_dtype), self, ())

    def resize_(self, num_embeddings: int, new_rows: torch.Tensor | None = None) -> None:
        """Keep the first `num_embeddings` rows or append `new_rows` (see `QuantizedTable.resize_`); as
        `BasisEmbedding.resize_` otherwise (padding_idx, a table already resized through a tied layer)."""
        if self.table.num_embeddings != num_embeddings or new_rows is not None:
            self.table.resize_(num_embeddings, new_rows)
        self.num_embeddings = num_embeddings
        if self.padding_idx is not None and self.padding_idx >= num_embeddings:
            self.padding_idx = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self.table.lookup(input, self.output_dtype)
        return out if self.max_norm is None else renorm_rows(out, self.max_norm, self.norm_type)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantEmbedding:
        # The output dtype follows the floating dtype `fn` converts to (.half(), .to(torch.bfloat16), ...).
        target = fn(torch.empty(0, dtype=self.output_dtype)).dtype
        if target != self.output_dtype:
            _check_output_dtype(target, "QuantEmbedding's output dtype")
        super()._apply(fn, recurse)
        self.output_dtype = target
        return self

    def extra_repr(self) -> str:
        options = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        if self.max_norm is not None:
            options += f", max_norm={self.max_norm}, norm_type={self.norm_type}"
        dtype = str(self.output_dtype).removeprefix("torch.")
        return f"{self.num_embeddings}, {self.embedding_dim}{options}, nbit={self.nbit}, dtype={dtype}"


class QuantLinear(_Frozen):
    """Frozen output layer (lm_head) y = x W^T + b over a QuantizedTable W of shape (out_features, in_features).

    The weight is dequantized on the fly, in `_LINEAR_CHUNK_ELEMENTS`-sized vocabulary chunks and in the input's
    dtype, so the dense weight is never stored (it is held for backward when x requires grad).

    Args:
        in_features, out_features: H and V.
        bias: whether the layer has a bias (a frozen buffer, zeros unless `_bias` gives the values).
        _weight: (out_features, in_features) floating matrix to quantize.
        _bias: (out_features,) bias values (requires bias=True).
        nbit: bits per value, one of 1, 2, 4, 8, 16, 32.
        table: an existing QuantizedTable, e.g. a tied QuantEmbedding's `.table` (the same object is kept, so the
            storage is shared); nbit / stochastic_round / seed are then the table's and these are ignored.
        device, dtype: for the weight's quantization and the bias buffer (default: _weight's, else fp32).

    Exactly one of `_weight`, `table` must be given. Input (..., H) fp32/fp16/bf16 -> (..., V) in the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        _weight: torch.Tensor | None = None,
        _bias: torch.Tensor | None = None,
        nbit: int = 32,
        table: QuantizedTable | None = None,
        stochastic_round: bool = False,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_nbit(nbit)
        if (_weight is None) == (table is None):
            raise ValueError("give exactly one of _weight or table")
        if _bias is not None and not bias:
            raise ValueError("_bias was given but bias=False")
        if table is not None:
            if not isinstance(table, QuantizedTable):
                raise TypeError(f"table must be a QuantizedTable, got {type(table).__name__}")
            _check_output_dtype(dtype or torch.float32, "dtype")
            device = device if device is not None else table.packed.device
            dtype = dtype or torch.float32
        else:
            _check_output_dtype(dtype or _weight.dtype, "QuantLinear's dtype (the weight's by default)")
            if tuple(_weight.shape) != (out_features, in_features):
                raise ValueError(
                    f"_weight must have shape (out_features, in_features) = ({out_features}, {in_features}), "
                    f"got {tuple(_weight.shape)}"
                )
            weight = _weight.detach() if device is None else _weight.detach().to(device)
            device, dtype = weight.device, dtype or weight.dtype
            table = QuantizedTable.from_weight(weight, nbit, stochastic_round=stochastic_round, seed=seed)
        if (table.num_embeddings, table.embedding_dim) != (out_features, in_features):
            raise ValueError(
                f"table is {table.num_embeddings} x {table.embedding_dim}, but out_features x in_features is "
                f"{out_features} x {in_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.table = table
        if bias:
            values = torch.zeros(out_features, device=device, dtype=dtype) if _bias is None else _bias.detach()
            if values.shape != (out_features,):
                raise ValueError(f"_bias must have shape ({out_features},), got {tuple(values.shape)}")
            self.register_buffer("bias", values.to(device=device, dtype=dtype, copy=True))
        else:
            self.bias = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        nbit: int,
        *,
        table: QuantizedTable | None = None,
        stochastic_round: bool = False,
        seed: int | None = None,
    ) -> QuantLinear:
        """Quantize `linear` (or, with `table`, reuse that table for its weight and keep only its bias)."""
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            _weight=linear.weight if table is None else None,
            _bias=linear.bias,
            nbit=nbit if table is None else table.nbit,
            table=table,
            stochastic_round=stochastic_round,
            seed=seed,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    @property
    def nbit(self) -> int:
        return self.table.nbit

    @property
    def weight(self) -> DecodedWeight:
        """Read-only dense (out_features, in_features) weight in the bias' dtype (fp32 without a bias); rebuilt on
        every access, O(V * H). In-place writes raise; `weight.requires_grad` is False (see DecodedWeight)."""
        dtype = torch.float32 if self.bias is None else self.bias.dtype
        return DecodedWeight.wrap(self.table.dequantize(dtype), self, ())

    def resize_(
        self, out_features: int, new_rows: torch.Tensor | None = None, new_bias: torch.Tensor | None = None
    ) -> None:
        """Keep the first `out_features` rows or append `new_rows` (see `QuantizedTable.resize_`) and `new_bias`
        (zeros if None); as `BasisLinear.resize_` otherwise."""
        if self.table.num_embeddings != out_features or new_rows is not None:
            self.table.resize_(out_features, new_rows)
        if self.bias is not None:
            resize_bias_(self.bias, out_features, new_bias)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        _check_output_dtype(x.dtype, "the input's dtype")
        chunk = max(1, _LINEAR_CHUNK_ELEMENTS // self.in_features)  # vocabulary rows per dequantized block
        outs = []
        for start in range(0, self.out_features, chunk):
            end = min(start + chunk, self.out_features)
            w = self.table.lookup(torch.arange(start, end, device=x.device), x.dtype)  # (end - start, H)
            b = None if self.bias is None else self.bias[start:end].to(x.dtype)
            outs.append(F.linear(x, w, b))  # (..., end - start)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, nbit={self.nbit}"
