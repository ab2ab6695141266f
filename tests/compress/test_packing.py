"""Row-wise bit packing: round trips, exact storage size, and the documented little-endian bit order."""

from __future__ import annotations

import struct

import pytest
import torch

from hf_basis.compress.packing import pack_bits, packed_nbytes, unpack_bits

NBITS = [1, 2, 4, 8, 16, 32]
DIMS = [1, 3, 7, 50, 301]


def random_values(shape: tuple[int, ...], nbit: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if nbit == 32:
        return torch.randn(shape, generator=g).view(torch.int32)  # float32 bit patterns, negative ones included
    return torch.randint(0, 2**nbit, shape, generator=g)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("nbit", NBITS)
def test_round_trip_and_storage_size(nbit, dim):
    values = random_values((2, 5, dim), nbit, seed=nbit * 1000 + dim)
    packed = pack_bits(values, nbit)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 5, -(-dim * nbit // 8))  # ceil(D * nbit / 8) bytes per row
    assert packed_nbytes(dim, nbit) == packed.shape[-1]
    unpacked = unpack_bits(packed, nbit, dim)
    assert unpacked.dtype == (torch.uint8 if nbit <= 8 else torch.int32)
    assert torch.equal(unpacked.long(), values.long())


@pytest.mark.parametrize("nbit", NBITS)
def test_single_rows_unpack_alone(nbit):
    values = random_values((6, 13), nbit, seed=nbit)
    packed = pack_bits(values, nbit)
    for row in range(6):
        assert torch.equal(unpack_bits(packed[row], nbit, 13).long(), values[row].long())


def test_bit_order_is_little_endian():
    # nbit=2: value j of a byte sits in bits [2j, 2j + 2): [1, 2, 3, 0 | 1] -> 1 + 2*4 + 3*16 + 0*64, then 1.
    assert pack_bits(torch.tensor([[1, 2, 3, 0, 1]]), 2).tolist() == [[57, 1]]
    assert pack_bits(torch.tensor([[0xA, 0x5, 0x3]]), 4).tolist() == [[0x5A, 0x03]]
    assert pack_bits(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1]]), 1).tolist() == [[0x81, 0x01]]
    # nbit=16: least-significant byte first.
    assert pack_bits(torch.tensor([[0x0102, 0xFFFE]]), 16).tolist() == [[0x02, 0x01, 0xFE, 0xFF]]
    # nbit=32: the float32 bytes in little-endian order, as struct writes them.
    floats = torch.tensor([[1.0, -2.5]])
    assert bytes(pack_bits(floats.view(torch.int32), 32).flatten().tolist()) == struct.pack("<2f", 1.0, -2.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="nbit"):
        pack_bits(torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([[-1]]), 2)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.zeros(2, 3), 2)
    with pytest.raises(TypeError, match="int32"):
        pack_bits(torch.zeros(2, 3, dtype=torch.long), 32)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 2, 13)
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(torch.zeros(2, 4, dtype=torch.int32), 2, 13)
