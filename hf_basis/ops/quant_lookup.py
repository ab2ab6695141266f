"""Quantized embedding lookup: gather packed rows, unpack their bit fields, map them through the level table.

    out[t, c] = levels[field_c(packed[ids[t]])]        packed: (V, ceil(D * nbit / 8)) uint8, levels: (2^nbit,) fp32
    out[t, c] = float32 bits of field_c(...)            for nbit = 32 (the bytes are the float32 weights)

The bit layout is `hf_basis.compress.packing`'s (row-wise little-endian stream). Only the looked-up rows are unpacked:
the dense (V, D) table is never built.

This file holds the PyTorch reference (CPU path and test oracle), the Triton kernel and the custom op that
dispatches between them.
Measured on an H100 (benchmarks/benchmark_quant_embedding.py, 8192 tokens x 4096, fp16 out): 61-69% of the copy
bandwidth at 2/4/8 bits; 16 bits reach only ~18%, bound by random gathers from the 256 KiB level table.
"""

from __future__ import annotations

import torch

from hf_basis.compress.packing import packed_nbytes, unpack_bits
from hf_basis.ops.custom_op import hf_basis_op
from hf_basis.ops.dispatch import use_triton
from hf_basis.ops.grid_math import cdiv, next_power_of_2
from hf_basis.validation import check_nbit

try:  # triton is missing on some platforms; the reference path needs none of it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["OUT_DTYPES", "quant_lookup", "quant_lookup_reference", "quant_lookup_triton"]

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Output dtypes the lookup writes."""


def _check_args(
    packed: torch.Tensor, levels: torch.Tensor, indices: torch.Tensor, nbit: int, dim: int, out_dtype: torch.dtype
) -> None:
    check_nbit(nbit)
    nbytes = packed_nbytes(dim, nbit)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != nbytes:
        raise ValueError(
            f"packed must be a uint8 (num_embeddings, ceil(dim * nbit / 8) = {nbytes}) tensor for dim={dim}, "
            f"nbit={nbit}; got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    num_levels = 0 if nbit == 32 else 2**nbit
    if levels.dtype != torch.float32 or levels.shape != (num_levels,):
        raise ValueError(
            f"levels must be a float32 ({num_levels},) tensor for nbit={nbit}; got {levels.dtype} of shape "
            f"{tuple(levels.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int64 or int32 token ids, got {indices.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {list(OUT_DTYPES)}, got {out_dtype}")


def quant_lookup_reference(
    packed: torch.Tensor,
    levels: torch.Tensor,
    indices: torch.Tensor,
    nbit: int,
    dim: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """PyTorch lookup: packed (V, nbytes) uint8, levels (2^nbit,) fp32, indices (...) int -> (..., dim) out_dtype.

    `index_select` raises IndexError for ids outside [0, V) on CPU (a device-side assert on CUDA), as nn.Embedding.
    """
    _check_args(packed, levels, indices, nbit, dim, out_dtype)
    flat = indices.reshape(-1)  # (N,)
    rows = packed.index_select(0, flat)  # (N, nbytes)
    fields = unpack_bits(rows, nbit, dim)  # (N, dim) uint8 / int32
    values = fields.view(torch.float32) if nbit == 32 else levels[fields.long()]  # (N, dim) fp32
    return values.to(out_dtype).reshape(*indices.shape, dim)


if triton is not None:

    @triton.jit
    def _quant_lookup_kernel(
        packed,  # (V, nbytes) uint8, contiguous
        levels,  # (2^NBIT,) fp32 (unused for NBIT = 32)
        ids,  # (N,) int32/int64
        out,  # (N, dim) contiguous, out dtype
        ok,  # (1,) int32, set to 0 when an id is out of range
        n_tokens,
        num_rows,
        nbytes,
        dim,
        NBIT: tl.constexpr,
        PER_BYTE: tl.constexpr,  # fields per byte, 8 // NBIT below 8 bits
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,  # output columns per program
        BLOCK_B: tl.constexpr,  # packed bytes per program below 8 bits, BLOCK_D // PER_BYTE
    ):
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        mask_t = offs_t < n_tokens
        tok = tl.load(ids + offs_t, mask=mask_t, other=0).to(tl.int64)
        bad = mask_t & ((tok < 0) | (tok >= num_rows))
        # Out-of-range ids are never read (masked) and reported through `ok`, which the host turns into an assert.
        tl.store(ok + tl.zeros_like(offs_t), tl.zeros_like(offs_t), mask=bad)
        mask_row = mask_t & ~bad
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) output columns
        mask_d = offs_d < dim

        if NBIT < 8:
            # A tile of whole bytes, contiguous per row (vectorised loads), then every byte fans out into its
            # 8 / NBIT fields, lowest bits first, and the (bytes, fields) pair flattens back to columns in order.
            offs_b = pid_d * BLOCK_B + tl.arange(0, BLOCK_B)
            mask_b = mask_row[:, None] & (offs_b < nbytes)[None, :]
            byte = tl.load(packed + tok[:, None] * nbytes + offs_b[None, :], mask=mask_b, other=0)  # (T, B) u8
            shifts = tl.arange(0, PER_BYTE) * NBIT  # (PER_BYTE,)
            fields = (byte.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << NBIT) - 1)
            fields = tl.reshape(fields, (BLOCK_T, BLOCK_D))  # (T, D): column b * PER_BYTE + j
            vals = tl.load(levels + fields)
        elif NBIT == 8:
            mask = mask_row[:, None] & mask_d[None, :]
            fields = tl.load(packed + tok[:, None] * nbytes + offs_d[None, :], mask=mask, other=0)
            vals = tl.load(levels + fields.to(tl.int32))
        elif NBIT == 16:
            # Rows are 2 * dim bytes, so reading them as little-endian uint16 is aligned and matches the packing.
            mask = mask_row[:, None] & mask_d[None, :]
            words = packed.to(tl.pointer_type(tl.uint16))
            fields = tl.load(words + tok[:, None] * dim + offs_d[None, :], mask=mask, other=0)
            vals = tl.load(levels + fields.to(tl.int32))
        else:
            # NBIT == 32: the packed bytes are the float32 weights themselves.
            mask = mask_row[:, None] & mask_d[None, :]
            floats = packed.to(tl.pointer_type(tl.float32))
            vals = tl.load(floats + tok[:, None] * dim + offs_d[None, :], mask=mask, other=0.0)

        vals = tl.where(mask_row[:, None], vals, 0.0)
        out_ptrs = out + offs_t.to(tl.int64)[:, None] * dim + offs_d[None, :]
        tl.store(out_ptrs, vals.to(out.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])


def _block_sizes(n_tokens: int, dim: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): up to 256 columns x 16 tokens per program, 4096 outputs.

    On an H100 (T=8192, D=4096, fp16 out) larger tiles (up to 16 x 1024, 8 warps) were within noise of this one.
    """
    block_d = max(8, min(256, next_power_of_2(dim)))  # >= 8 so that a 1-bit tile holds a whole byte
    block_t = max(1, min(next_power_of_2(n_tokens), 4096 // block_d))
    return block_t, block_d, 4


def quant_lookup_triton(
    packed: torch.Tensor,
    levels: torch.Tensor,
    indices: torch.Tensor,
    nbit: int,
    dim: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton lookup, same contract as `quant_lookup_reference`.

    Ids outside [0, V) raise IndexError on CPU (Triton interpreter) and trigger a device-side assert on CUDA (like
    nn.Embedding; the kernel never reads out of bounds).
    """
    if triton is None:
        raise RuntimeError("quant_lookup_triton needs the `triton` package; use quant_lookup_reference")
    _check_args(packed, levels, indices, nbit, dim, out_dtype)
    num_rows = packed.shape[0]
    flat = indices.reshape(-1).contiguous()  # (N,)
    if not flat.is_cuda and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_rows):
        raise IndexError("index out of range in self")
    packed = packed.contiguous()
    if packed.data_ptr() % 4:  # the 16/32-bit paths read whole aligned words
        packed = packed.clone()
    out = torch.empty(flat.numel(), dim, dtype=out_dtype, device=packed.device)  # (N, dim)
    if flat.numel() and dim:
        ok = torch.ones(1, dtype=torch.int32, device=packed.device)
        table = levels.contiguous() if nbit != 32 else packed  # nbit 32 reads no levels; any valid pointer does
        block_t, block_d, num_warps = _block_sizes(flat.numel(), dim)
        per_byte = 8 // nbit if nbit < 8 else 1
        grid = (cdiv(flat.numel(), block_t), cdiv(dim, block_d))
        _quant_lookup_kernel[grid](
            packed, table, flat, out, ok,
            flat.numel(), num_rows, packed.shape[1], dim,
            NBIT=nbit, PER_BYTE=per_byte, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_B=block_d // per_byte,
            num_warps=num_warps,
        )  # fmt: skip
        if flat.is_cuda:
            torch._assert_async(ok, "quant_lookup: token id out of range [0, num_embeddings)")
    return out.reshape(*indices.shape, dim)


def _quant_lookup_impl(
    packed: torch.Tensor, levels: torch.Tensor, indices: torch.Tensor, nbit: int, dim: int, out_dtype: torch.dtype
) -> torch.Tensor:
    if use_triton(packed, levels, indices):
        return quant_lookup_triton(packed, levels, indices, nbit, dim, out_dtype)
    return quant_lookup_reference(packed, levels, indices, nbit, dim, out_dtype)


def _quant_lookup_fake(packed, levels, indices, nbit, dim, out_dtype):
    return packed.new_empty(*indices.shape, dim, dtype=out_dtype)


_quant_lookup_op = hf_basis_op("quant_lookup", _quant_lookup_impl, _quant_lookup_fake)


def quant_lookup(
    packed: torch.Tensor,
    levels: torch.Tensor,
    indices: torch.Tensor,
    nbit: int,
    dim: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Quantized embedding lookup: packed (V, ceil(dim * nbit / 8)) uint8, levels (2^nbit,) fp32 ((0,) for
    nbit = 32), indices (...) int64/int32 -> (..., dim) in out_dtype (fp32, fp16 or bf16).

    Runs the Triton kernel on CUDA, the PyTorch reference elsewhere
    (or everywhere with HF_BASIS_DISABLE_TRITON=1). Not differentiable: the table is frozen.
    A custom op (`torch.ops.hf_basis.quant_lookup`): torch.compile / torch.export keep it whole in their graphs.
    """
    _check_args(packed, levels, indices, nbit, dim, out_dtype)  # before tracing, so that errors name the argument
    return _quant_lookup_op(packed, levels, indices, nbit, dim, out_dtype)
