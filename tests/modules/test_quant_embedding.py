"""QuantizedTable / QuantEmbedding / QuantLinear / quantize_embed against hand-written SmallFry references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_basis.compress.uniform import find_clip_threshold
from hf_basis.modules import quant_embedding as qe
from hf_basis import quantize_embed
from hf_basis.modules.quant_embedding import QuantEmbedding, QuantizedTable, QuantLinear

# --------------------------------------------------------------------------------------------------------------------
# Helpers (independent of the code under test)
# --------------------------------------------------------------------------------------------------------------------


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    chi2 = torch.randn(3, rows, cols, generator=g, dtype=torch.float64).square().sum(0)
    return (normal / (chi2 / 3).sqrt()).float()


def smallfry_reference(w: torch.Tensor, nbit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip at the golden-section threshold, round half-to-even onto 2^nbit levels over [-r, r] (float64).

    Returns the reconstruction and a mask of entries that are not within 1e-3 of a rounding tie (where float32 and
    float64 arithmetic may legitimately round differently).
    """
    r = find_clip_threshold(w, nbit)
    steps = 2**nbit - 1
    pos = (w.double().clamp(-r, r) + r) * steps / (2 * r)
    recon = -r + torch.round(pos) * (2 * r / steps)
    return recon, (pos - pos.floor() - 0.5).abs() > 1e-3


def write_glove(path, rows: torch.Tensor) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows.tolist()):
            f.write(f"word{i} " + " ".join(repr(v) for v in row) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbit", [1, 2, 4, 8])
def test_already_quantized_input_is_stored_exactly(nbit):
    g = torch.Generator().manual_seed(nbit)
    values = torch.randn(2**nbit, generator=g)
    w = values[torch.randint(0, 2**nbit, (30, 11), generator=g)]
    emb = QuantEmbedding(30, 11, _weight=w, nbit=nbit)
    assert emb.table.clip is None and emb.table.relative_error == 0.0
    assert torch.equal(emb.weight, w)
    ids = torch.randint(0, 30, (3, 7), generator=g)
    assert torch.equal(emb(ids), w[ids])


def test_16_bit_small_matrix_is_exact():
    # 600 distinct values <= 2^16: stored losslessly, as in SmallFry.
    w = torch.randn(20, 30)
    assert torch.equal(QuantEmbedding(20, 30, _weight=w, nbit=16).weight, w)


@pytest.mark.parametrize("nbit", [1, 2, 4, 8])
def test_output_matches_smallfry_reference(nbit):
    w = heavy_tailed(64, 33, seed=nbit)
    emb = QuantEmbedding(64, 33, _weight=w, nbit=nbit)
    recon, not_a_tie = smallfry_reference(w, nbit)
    r = emb.table.clip
    assert r == find_clip_threshold(w, nbit)
    dense = emb.weight.double()
    torch.testing.assert_close(dense[not_a_tie], recon[not_a_tie], rtol=0, atol=1e-6 * r)
    ids = torch.randint(0, 64, (5, 4))
    assert torch.equal(emb(ids), emb.weight[ids])
    expected_error = float((w.double() - dense).norm() / w.double().norm())
    assert emb.table.relative_error == pytest.approx(expected_error, rel=1e-5)


def test_nbit_32_is_lossless_and_storage_size():
    w = heavy_tailed(10, 7)
    emb = QuantEmbedding(10, 7, _weight=w)
    assert torch.equal(emb.weight, w) and emb.table.levels.numel() == 0
    for nbit in (1, 2, 4, 8, 16, 32):
        table = QuantizedTable.from_weight(heavy_tailed(10, 7), nbit)
        levels = 0 if nbit == 32 else 2**nbit
        assert table.packed.shape == (10, -(-7 * nbit // 8))
        assert table.nbytes() == 10 * (-(-7 * nbit // 8)) + 4 * levels


@pytest.mark.parametrize("nbit", [2, 32])
def test_padding_row_keeps_its_value_like_nn_embedding(nbit):
    w = heavy_tailed(12, 5) + 1.0  # the padding row is not zero (a trained [PAD], or pad = eos)
    emb = QuantEmbedding(12, 5, padding_idx=-2, _weight=w, nbit=nbit)
    no_pad = QuantEmbedding(12, 5, _weight=w, nbit=nbit)
    assert emb.padding_idx == 10
    ids = torch.tensor([[10, 3, 10]])
    assert torch.equal(emb(ids), no_pad(ids)) and torch.equal(emb.weight, no_pad.weight)
    assert torch.all(emb(ids)[0, 0] != 0)
    if nbit == 32:  # stored exactly: nn.Embedding with the same padding_idx returns the same rows
        torch.testing.assert_close(emb(ids), nn.Embedding.from_pretrained(w, padding_idx=10)(ids), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# GloVe files
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbit", [4, 32])
def test_glove_file_matches_tensor(tmp_path, nbit):
    w = heavy_tailed(15, 6, seed=7)
    write_glove(tmp_path / "glove.txt", w)
    from_file = QuantEmbedding(15, 6, nbit=nbit, embedding_file=tmp_path / "glove.txt")
    from_tensor = QuantEmbedding(15, 6, _weight=w, nbit=nbit)
    assert torch.equal(from_file.weight, from_tensor.weight)
    if nbit == 32:
        assert torch.equal(from_file.weight, w)


def test_glove_file_errors_and_short_file(tmp_path):
    path = tmp_path / "bad.txt"
    write_glove(path, heavy_tailed(4, 6))
    lines = path.read_text().splitlines()
    lines[2] = " ".join(lines[2].split(" ")[:-1])  # line 3 has 5 values
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 3.*embedding_dim=6"):
        QuantEmbedding(4, 6, embedding_file=path)

    write_glove(path, heavy_tailed(5, 6))
    with pytest.raises(ValueError, match="more than num_embeddings=4"):
        QuantEmbedding(4, 6, embedding_file=path)

    w = heavy_tailed(3, 6)
    write_glove(path, w)
    with pytest.warns(UserWarning, match="rows 3..4 are zero"):
        emb = QuantEmbedding(5, 6, embedding_file=path)
    assert torch.equal(emb.weight[:3], w) and torch.all(emb.weight[3:] == 0)


# --------------------------------------------------------------------------------------------------------------------
# Frozen, dtypes, errors
# --------------------------------------------------------------------------------------------------------------------


def test_frozen():
    emb = QuantEmbedding(8, 4, _weight=torch.randn(8, 4), nbit=2)
    assert list(emb.parameters()) == []
    with pytest.raises(RuntimeError, match="frozen"):
        emb.requires_grad_(True)
    assert emb.requires_grad_(False) is emb
    assert not emb(torch.tensor([1])).requires_grad
    with pytest.raises(AttributeError):
        emb.weight = torch.zeros(8, 4)


def test_output_dtypes_follow_weight_argument_and_conversions():
    w = heavy_tailed(16, 9)
    ids = torch.randint(0, 16, (2, 3))
    fp32 = QuantEmbedding(16, 9, _weight=w, nbit=4)
    for dtype in (torch.float16, torch.bfloat16):
        from_weight = QuantEmbedding(16, 9, _weight=w.to(dtype), nbit=4)
        assert from_weight(ids).dtype == dtype
        assert QuantEmbedding(16, 9, _weight=w, nbit=4, dtype=dtype)(ids).dtype == dtype

    emb = QuantEmbedding(16, 9, _weight=w, nbit=4).half()
    assert emb.output_dtype == torch.float16 and emb.table.levels.dtype == torch.float32
    assert torch.equal(emb(ids), fp32(ids).half())
    emb.to(torch.bfloat16)
    assert torch.equal(emb(ids), fp32(ids).bfloat16())
    assert torch.equal(emb.float()(ids), fp32(ids))
    with pytest.raises(ValueError, match="output dtype"):
        emb.double()


def test_levels_stay_exact_under_half():
    # 16-bit levels do not fit fp16; the table keeps them in fp32 and only the output is rounded.
    table = QuantizedTable.from_weight(heavy_tailed(300, 300), 16)
    levels = table.levels.clone()
    table.half()
    assert table.levels.dtype == torch.float32 and torch.equal(table.levels, levels)


def test_bad_arguments(tmp_path):
    w = torch.randn(6, 4)
    write_glove(tmp_path / "g.txt", w)
    with pytest.raises(ValueError, match="nbit must be one of"):
        QuantEmbedding(6, 4, _weight=w, nbit=3)
    with pytest.raises(ValueError, match="exactly one of"):
        QuantEmbedding(6, 4, _weight=w, embedding_file=tmp_path / "g.txt")
    with pytest.raises(ValueError, match="exactly one of"):
        QuantEmbedding(6, 4)
    with pytest.raises(ValueError, match="sparse"):
        QuantEmbedding(6, 4, sparse=True, _weight=w)
    with pytest.raises(ValueError, match="shape"):
        QuantEmbedding(6, 5, _weight=w)
    with pytest.raises(ValueError, match="padding_idx"):
        QuantEmbedding(6, 4, padding_idx=6, _weight=w)
    with pytest.raises(ValueError, match="dtype"):
        QuantEmbedding(6, 4, _weight=w, dtype=torch.int32)
    emb = QuantEmbedding(6, 4, _weight=w, nbit=2)
    for bad in (6, -1):
        with pytest.raises(IndexError):
            emb(torch.tensor([[0, bad]]))


# --------------------------------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbit", [1, 4, 16, 32])
def test_state_dict_round_trip(nbit):
    emb = QuantEmbedding(40, 13, padding_idx=0, _weight=heavy_tailed(40, 13), nbit=nbit)
    fresh = QuantEmbedding(40, 13, padding_idx=0, table=QuantizedTable(40, 13, nbit))
    fresh.load_state_dict(emb.state_dict())
    ids = torch.randint(0, 40, (4, 9))
    assert torch.equal(fresh(ids), emb(ids))
    assert set(emb.state_dict()) == {"table.packed", "table.levels"}


def test_state_dict_validation():
    emb = QuantEmbedding(10, 7, _weight=heavy_tailed(10, 7), nbit=4)
    state = emb.state_dict()
    with pytest.raises(RuntimeError, match="table.packed.*uint8"):
        emb.load_state_dict({**state, "table.packed": state["table.packed"].float()})
    with pytest.raises(RuntimeError, match=r"table.levels.*\(16,\)"):
        emb.load_state_dict({**state, "table.levels": torch.zeros(4)})
    other = QuantEmbedding(10, 7, _weight=heavy_tailed(10, 7), nbit=2)
    with pytest.raises(RuntimeError, match=r"nbit=4\) expects torch.uint8 of shape \(10, 4\)"):
        emb.load_state_dict(other.state_dict())


# --------------------------------------------------------------------------------------------------------------------
# QuantLinear
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quant_linear_matches_dense_linear(dtype, monkeypatch):
    linear = nn.Linear(24, 50)
    head = QuantLinear.from_linear(linear, 4)
    assert torch.equal(head.bias, linear.bias.detach())
    x = torch.randn(3, 5, 24).to(dtype)
    w = head.table.dequantize(torch.float32)
    expected = F.linear(x.float(), w.to(dtype).float(), linear.bias.detach().to(dtype).float())
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    out = head(x)
    assert out.dtype == dtype and out.shape == (3, 5, 50)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    monkeypatch.setattr(qe, "_LINEAR_CHUNK_ELEMENTS", 24 * 7)  # 8 chunks of <= 7 words
    chunked = head(x)
    assert chunked.dtype == dtype and chunked.shape == (3, 5, 50)
    torch.testing.assert_close(chunked.float(), expected, rtol=tol, atol=tol)


def test_quant_linear_tied_to_embedding_shares_the_table():
    w = heavy_tailed(30, 8)
    emb = QuantEmbedding(30, 8, _weight=w, nbit=2)
    linear = nn.Linear(8, 30, bias=False)
    linear.weight = nn.Parameter(w)
    head = QuantLinear.from_linear(linear, 2, table=emb.table)
    assert head.table is emb.table and head.bias is None
    x = torch.randn(4, 8)
    torch.testing.assert_close(head(x), x @ emb.weight.T)

    model = nn.ModuleDict({"embed": emb, "head": head}).half()
    assert model["head"].table is model["embed"].table and emb.table.levels.dtype == torch.float32
    fresh_table = QuantizedTable(30, 8, 2)
    fresh = nn.ModuleDict({
        "embed": QuantEmbedding(30, 8, table=fresh_table),
        "head": QuantLinear(8, 30, bias=False, table=fresh_table),
    })  # fmt: skip
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh["head"](x), head(x))


def test_quant_linear_state_dict_and_errors():
    head = QuantLinear.from_linear(nn.Linear(6, 11), 8)
    fresh = QuantLinear(6, 11, table=QuantizedTable(11, 6, 8))
    fresh.load_state_dict(head.state_dict())
    x = torch.randn(2, 6)
    assert torch.equal(fresh(x), head(x))
    with pytest.raises(RuntimeError, match="frozen"):
        head.requires_grad_()
    with pytest.raises(ValueError, match="exactly one of"):
        QuantLinear(6, 11)
    with pytest.raises(ValueError, match="nbit"):
        QuantLinear(6, 11, _weight=torch.randn(11, 6), nbit=5)
    with pytest.raises(ValueError, match="11 x 6"):
        QuantLinear(7, 11, table=QuantizedTable(11, 6, 8))


# --------------------------------------------------------------------------------------------------------------------
# quantize_embed
# --------------------------------------------------------------------------------------------------------------------


def test_quantize_embed_replaces_nested_embeddings():
    model = nn.ModuleList([
        nn.Sequential(nn.Embedding(20, 6, padding_idx=1), nn.Linear(6, 6)),
        nn.ModuleList([nn.Embedding(10, 3), nn.Sequential(nn.Embedding(7, 5).half())]),
        nn.Embedding(12, 4),
    ])  # fmt: skip
    dense = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    out = quantize_embed(model, nbit=4)
    assert out is model
    quant = [m for m in model.modules() if isinstance(m, QuantEmbedding)]
    assert len(quant) == 4 and not any(isinstance(m, nn.Embedding) for m in model.modules())
    assert quant[0].padding_idx == 1 and quant[2].output_dtype == torch.float16
    for old, new in zip(dense, quant):
        assert (new.num_embeddings, new.embedding_dim) == (old.num_embeddings, old.embedding_dim)
        assert torch.equal(new.weight, QuantEmbedding(
            old.num_embeddings, old.embedding_dim, old.padding_idx, _weight=old.weight, nbit=4
        ).weight)  # fmt: skip
    with pytest.raises(ValueError, match="nbit must be one of"):
        quantize_embed(nn.Sequential(nn.Embedding(3, 3)), nbit=3)


def test_quantize_embed_keeps_sharing():
    shared = nn.Embedding(16, 4)
    model = nn.Module()
    model.shared = shared
    model.encoder = nn.Module()
    model.encoder.embed_tokens = shared
    model.decoder = nn.Sequential(shared, nn.Linear(4, 4))
    model.decoder.add_module("again", shared)  # twice under one parent
    quantize_embed(model, nbit=2)
    q = model.shared
    assert isinstance(q, QuantEmbedding)
    assert model.encoder.embed_tokens is q and model.decoder[0] is q and model.decoder.again is q


def test_quantize_embed_skips_subclasses_with_their_own_forward():
    class Scaled(nn.Embedding):
        def forward(self, input):
            return super().forward(input) * 2.0

    model = nn.Sequential(Scaled(5, 3), nn.Embedding(5, 3))
    with pytest.warns(UserWarning, match="0 \\(Scaled\\)"):
        quantize_embed(model, nbit=8)
    assert type(model[0]) is Scaled and isinstance(model[1], QuantEmbedding)
    assert isinstance(quantize_embed(nn.Embedding(4, 2), nbit=2), QuantEmbedding)
