"""Quantized embedding lookup: the PyTorch reference against a plain gather of the unpacked codes, the Triton kernel
against the reference, and the dispatch.

The Triton kernel runs on CPU through Triton's interpreter by default (CI has no GPU); set HF_BASIS_TEST_DEVICE=cuda
to run the same tests on a GPU for real. Shapes are small: the interpreter runs every program in Python.
"""

from __future__ import annotations

import pytest
import torch

from kernel_device import DEVICE, require_device

from hf_basis.compress.packing import pack_bits

triton = pytest.importorskip("triton")
require_device()

import hf_basis.ops.quant_lookup as op  # noqa: E402

NBITS = [1, 2, 4, 8, 16, 32]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_table(V: int, D: int, nbit: int, seed: int = 0):
    """Random codes (V, D), their packed rows, a random non-zero level table, and the dense fp32 matrix."""
    g = torch.Generator().manual_seed(seed)
    if nbit == 32:
        dense = torch.randn(V, D, generator=g) + 3.0  # never zero
        codes, levels = dense.view(torch.int32), torch.empty(0)
    else:
        codes = torch.randint(0, 2**nbit, (V, D), generator=g)
        levels = torch.randn(2**nbit, generator=g) + 3.0
        dense = levels[codes]
    return pack_bits(codes, nbit), levels, dense


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.bfloat16 and DEVICE == "cpu":
        # The interpreter converts fp32 -> bf16 by truncation, not round-to-nearest: at most one bf16 ulp apart.
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(out.cpu(), ref.cpu())


# --------------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 3, 7, 50])
@pytest.mark.parametrize("nbit", NBITS)
def test_reference_gathers_the_dense_rows(nbit, dim):
    packed, levels, dense = make_table(13, dim, nbit, seed=nbit + dim)
    ids = torch.randint(0, 13, (4, 6))
    out = op.quant_lookup_reference(packed, levels, ids, nbit, dim, torch.float32)
    assert torch.equal(out, dense[ids])
    half = op.quant_lookup_reference(packed, levels, ids, nbit, dim, torch.float16)
    assert torch.equal(half, dense[ids].half())


def test_reference_errors():
    packed, levels, dense = make_table(9, 5, 4)
    ids = torch.tensor([[0, 3, 3, 8]])
    for bad in (9, -1):
        with pytest.raises(IndexError):
            op.quant_lookup_reference(packed, levels, torch.tensor([bad]), 4, 5, torch.float32)
    with pytest.raises(ValueError, match="packed"):
        op.quant_lookup_reference(packed, levels, ids, 4, 7, torch.float32)
    with pytest.raises(ValueError, match="levels"):
        op.quant_lookup_reference(packed, levels[:8], ids, 4, 5, torch.float32)
    with pytest.raises(TypeError, match="indices"):
        op.quant_lookup_reference(packed, levels, ids.float(), 4, 5, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        op.quant_lookup_reference(packed, levels, ids, 4, 5, torch.float64)


# --------------------------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("dim", [1, 3, 7, 50])
@pytest.mark.parametrize("nbit", NBITS)
def test_triton_matches_reference(nbit, dim, out_dtype):
    packed, levels, _ = make_table(17, dim, nbit, seed=10 * nbit + dim)
    ids = torch.randint(0, 17, (3, 5))
    ref = op.quant_lookup_reference(packed, levels, ids, nbit, dim, out_dtype)
    out = op.quant_lookup_triton(packed.to(DEVICE), levels.to(DEVICE), ids.to(DEVICE), nbit, dim, out_dtype)
    assert_matches_reference(out, ref)


@pytest.mark.parametrize("nbit", NBITS)
def test_triton_several_blocks_one_token_and_int32_ids(nbit):
    # dim 301 > one 256-column block, 40 tokens > one token block at that width; then a single token.
    packed, levels, dense = make_table(23, 301, nbit, seed=nbit)
    ids = torch.randint(0, 23, (40,), dtype=torch.int32)
    args = (packed.to(DEVICE), levels.to(DEVICE))
    out = op.quant_lookup_triton(*args, ids.to(DEVICE), nbit, 301, torch.float32)
    assert torch.equal(out.cpu(), dense[ids.long()])
    one = op.quant_lookup_triton(*args, torch.tensor([22], device=DEVICE), nbit, 301, torch.float16)
    assert one.shape == (1, 301) and torch.equal(one.cpu(), dense[[22]].half())
    empty = op.quant_lookup_triton(*args, torch.zeros(0, 2, dtype=torch.long, device=DEVICE), nbit, 301, torch.float16)
    assert empty.shape == (0, 2, 301)


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA an out-of-range id is a device-side assert, as in nn.Embedding")
def test_triton_out_of_range_raises_index_error():
    packed, levels, _ = make_table(5, 3, 2)
    for bad in (5, -1):
        with pytest.raises(IndexError):
            op.quant_lookup_triton(packed, levels, torch.tensor([0, bad]), 2, 3, torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------------


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path must not run on CPU tensors")

    monkeypatch.setattr(op, "quant_lookup_triton", fail)
    packed, levels, dense = make_table(7, 10, 2)
    ids = torch.tensor([[1, 2], [6, 0]])
    assert torch.equal(op.quant_lookup(packed, levels, ids, 2, 10, torch.float32), dense[ids])
    with pytest.raises(IndexError):
        op.quant_lookup(packed, levels, torch.tensor([7]), 2, 10, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dispatch_uses_triton_on_cuda(monkeypatch):
    packed, levels, dense = make_table(7, 10, 4)
    ids = torch.tensor([[1, 2], [6, 0]], device="cuda")
    out = op.quant_lookup(packed.cuda(), levels.cuda(), ids, 4, 10, torch.float16)
    assert torch.equal(out.cpu(), dense[ids.cpu()].half())
    monkeypatch.setenv("HF_BASIS_DISABLE_TRITON", "1")
    monkeypatch.setattr(op, "quant_lookup_triton", None)  # would fail if called
    assert torch.equal(op.quant_lookup(packed.cuda(), levels.cuda(), ids, 4, 10, torch.float16).cpu(), out.cpu())
