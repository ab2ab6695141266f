"""Row-wise bit packing of level indices into bytes.

Layout: each row of D values becomes ceil(D * nbit / 8) bytes, padded with zero bits to a whole byte on its own,
so any single row can be unpacked without its neighbours (a lookup reads only the rows it needs). Within a row the
bits form one little-endian stream: value c occupies bits [c * nbit, (c + 1) * nbit), and bit i of the stream is
bit (i % 8) of byte i // 8. Concretely:

- nbit < 8: byte k holds values k * (8 / nbit) + j, j = 0, 1, ..., value j in bits [j * nbit, (j + 1) * nbit)
  (the first value in the lowest bits);
- nbit = 8: one byte per value;
- nbit = 16: two bytes per value, least-significant byte first;
- nbit = 32: four bytes per value, least-significant byte first. The values are the int32 bit patterns of float32
  weights (`w.view(torch.int32)`), so storage is uniformly uint8 of ceil(D * nbit / 8) bytes per row.

The byte order is explicit (shifts and masks), so it does not depend on the host's endianness; the Triton lookup
reads 16/32-bit values with wide loads, which matches this order on little-endian GPUs.
"""

from __future__ import annotations

import torch

from hf_basis.compress.uniform import index_dtype
from hf_basis.validation import check_nbit

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]


def packed_nbytes(dim: int, nbit: int) -> int:
    """Bytes per packed row of `dim` values of `nbit` bits: ceil(dim * nbit / 8)."""
    return (dim * nbit + 7) // 8


def pack_bits(indices: torch.Tensor, nbit: int) -> torch.Tensor:
    """Pack integer values row-wise: indices (..., D) -> uint8 (..., ceil(D * nbit / 8)) on the same device.

    Args:
        indices: integer tensor with values in [0, 2^nbit) for nbit <= 16; for nbit = 32 an int32 tensor (any
            bit pattern, typically float32 weights viewed as int32).
        nbit: one of (1, 2, 4, 8, 16, 32).
    """
    check_nbit(nbit)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.dim() == 0:
        raise ValueError("indices must have at least one dimension (the packed one)")
    if nbit == 32:
        if indices.dtype != torch.int32:
            raise TypeError(f"nbit=32 packs int32 bit patterns (use w.view(torch.int32)), got {indices.dtype}")
    elif indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 2**nbit):
        raise ValueError(f"indices must lie in [0, {2**nbit}) for nbit={nbit}")

    *lead, dim = indices.shape
    if nbit <= 8:
        per_byte = 8 // nbit
        nbytes = packed_nbytes(dim, nbit)
        v = indices.to(torch.uint8)
        if nbytes * per_byte != dim:  # zero bits pad the row to a whole byte
            v = torch.cat([v, v.new_zeros(*lead, nbytes * per_byte - dim)], dim=-1)
        v = v.reshape(*lead, nbytes, per_byte)
        packed = v[..., 0].clone()
        for j in range(1, per_byte):
            packed |= v[..., j] << (j * nbit)  # uint8 shift: values < 2^nbit, nothing spills out of the byte
        return packed

    bytes_per_value = nbit // 8
    v = indices.to(index_dtype(nbit))  # int32: arithmetic shifts, but the 0xFF mask keeps exactly one byte
    packed = torch.empty(*lead, dim, bytes_per_value, dtype=torch.uint8, device=indices.device)
    for k in range(bytes_per_value):
        packed[..., k] = (v >> (8 * k)) & 0xFF
    return packed.reshape(*lead, dim * bytes_per_value)


def unpack_bits(packed: torch.Tensor, nbit: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 (..., ceil(dim * nbit / 8)) -> (..., dim).

    Returns uint8 values for nbit <= 8 and int32 for nbit = 16 and 32 (for 32: the float32 bit patterns, recover the
    floats with `.view(torch.float32)`), the same dtypes `uniform.quantize_matrix` produces.
    """
    check_nbit(nbit)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if dim < 0:
        raise ValueError(f"dim must be >= 0, got {dim}")
    nbytes = packed_nbytes(dim, nbit)
    if packed.dim() == 0 or packed.shape[-1] != nbytes:
        raise ValueError(
            f"packed must have ceil(dim * nbit / 8) = {nbytes} bytes in its last dimension for dim={dim}, "
            f"nbit={nbit}; got shape {tuple(packed.shape)}"
        )

    *lead, _ = packed.shape
    if nbit <= 8:
        shifts = torch.arange(0, 8, nbit, dtype=torch.uint8, device=packed.device)  # (8 / nbit,)
        values = (packed.unsqueeze(-1) >> shifts) & (2**nbit - 1)  # (..., nbytes, 8 / nbit)
        return values.reshape(*lead, nbytes * (8 // nbit))[..., :dim]

    bytes_per_value = nbit // 8
    b = packed.reshape(*lead, dim, bytes_per_value).to(torch.int32)
    values = b[..., 0].clone()
    for k in range(1, bytes_per_value):
        values |= b[..., k] << (8 * k)  # int32 shifts wrap, so byte 3 lands in the sign bit as intended
    return values
