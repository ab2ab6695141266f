"""BasisEmbedding / BasisLinear against the dense layer decoded from the same codebook (independent reference)."""

import pytest
import torch
import torch.nn.functional as F

from hf_basis import BasisEmbedding, BasisLinear, Codebook


def random_codebook(V=53, D=24, B=4, K=7, dtype=torch.float32, seed=0) -> Codebook:
    g = torch.Generator().manual_seed(seed)
    book = Codebook(V, D, B, K, dtype=dtype)
    with torch.no_grad():
        book.codes.copy_(torch.randint(0, K, (V, B), generator=g))
        book.centroids.copy_(torch.randn(B, K, D // B, generator=g))
    return book


def dense_from(book: Codebook) -> torch.Tensor:
    """Hand-written decode: row w = concat over b of centroids[b, codes[w, b]]."""
    V, B = book.codes.shape
    rows = []
    for w in range(V):
        rows.append(torch.cat([book.centroids[b, int(book.codes[w, b])] for b in range(B)]))
    return torch.stack(rows)


def test_codebook_decode_matches_hand_loop():
    book = random_codebook()
    torch.testing.assert_close(book.decode(), dense_from(book), rtol=0, atol=0)


@pytest.mark.parametrize("K, dtype", [(7, torch.uint8), (256, torch.uint8), (257, torch.int16), (32768, torch.int16)])
def test_codes_use_smallest_integer_dtype(K, dtype):
    assert Codebook(max(K, 10), 8, 2, K).codes.dtype == dtype


def test_embedding_forward_and_grad_match_dense():
    book = random_codebook()
    emb = BasisEmbedding(53, 24, codebook=book)
    ids = torch.randint(0, 53, (3, 11))
    out = emb(ids)
    dense_w = dense_from(book).detach().requires_grad_(True)
    ref = F.embedding(ids, dense_w)
    torch.testing.assert_close(out, ref)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    # d loss / d centroid[b, k] = sum of the dense row gradients of the words using k in sub-space b.
    expected = torch.zeros_like(book.centroids)
    d = 24 // 4
    for w in range(53):
        for b in range(4):
            expected[b, int(book.codes[w, b])] += dense_w.grad[w, b * d:(b + 1) * d]
    torch.testing.assert_close(book.centroids.grad, expected)


def test_embedding_padding_row_keeps_its_value_and_gets_no_grad_like_nn_embedding():
    book = random_codebook()
    emb = BasisEmbedding(53, 24, padding_idx=5, codebook=book)
    dense_w = dense_from(book).detach().requires_grad_(True)
    ids = torch.tensor([[5, 3, 5, 17, 3]])
    out = emb(ids)
    ref = F.embedding(ids, dense_w, padding_idx=5)  # nn.Embedding's lookup: row 5 as stored, no gradient
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.all(out[0, 0] != 0)
    torch.testing.assert_close(emb.weight, dense_w.detach(), rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    assert torch.count_nonzero(dense_w.grad[5]) == 0
    expected = torch.zeros_like(book.centroids)  # the dense gradient, summed per centroid through the codes
    for w in range(53):
        for b in range(4):
            expected[b, int(book.codes[w, b])] += dense_w.grad[w, b * 6:(b + 1) * 6]
    torch.testing.assert_close(book.centroids.grad, expected)


def test_embedding_out_of_range_ids_raise_like_nn_embedding():
    emb = BasisEmbedding(53, 24, codebook=random_codebook())
    dense = torch.nn.Embedding(53, 24)
    for bad in (torch.tensor([53]), torch.tensor([-1])):
        with pytest.raises(IndexError) as ours:
            emb(bad)
        with pytest.raises(IndexError) as theirs:
            dense(bad)
        assert type(ours.value) is type(theirs.value)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_and_grads_match_dense_fp32(bias):
    book = random_codebook()
    lin = BasisLinear(24, 53, bias=bias, codebook=book)
    if bias:
        with torch.no_grad():
            lin.bias.normal_()
    x = torch.randn(2, 5, 24, requires_grad=True)
    out = lin(x)

    dense_w = dense_from(book).detach().requires_grad_(True)
    dense_b = lin.bias.detach().clone().requires_grad_(True) if bias else None
    x_ref = x.detach().clone().requires_grad_(True)
    ref = F.linear(x_ref, dense_w, dense_b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(lin.bias.grad, dense_b.grad, rtol=1e-5, atol=1e-5)
    expected = torch.zeros_like(book.centroids)
    d = 24 // 4
    for w in range(53):
        for b in range(4):
            expected[b, int(book.codes[w, b])] += dense_w.grad[w, b * d:(b + 1) * d]
    torch.testing.assert_close(book.centroids.grad, expected, rtol=1e-5, atol=1e-5)


def test_linear_bf16_close_to_fp32_reference():
    book = random_codebook()
    lin = BasisLinear(24, 53, codebook=book).to(torch.bfloat16)
    x = torch.randn(4, 24)
    out = lin(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    ref = F.linear(x, dense_from(book).float(), lin.bias.float())
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=5e-2)
    out.float().sum().backward()
    assert book.centroids.grad.dtype == torch.bfloat16 and torch.isfinite(book.centroids.grad.float()).all()


def test_weight_property_is_read_only_and_decodes():
    book = random_codebook()
    lin = BasisLinear(24, 53, codebook=book)
    torch.testing.assert_close(lin.weight, dense_from(book))
    with pytest.raises(AttributeError):
        lin.weight = torch.zeros(53, 24)


def test_no_v_by_h_or_t_by_v_by_b_tensor_is_ever_built():
    """Every tensor any op produces in forward and backward stays below V x H (and far below T x V x B)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    V, D, B, K, T = 4000, 64, 8, 16, 32  # logits T x V = 128k elements < V x D = 256k < T x V x B = 1M

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    book = Codebook(V, D, B, K)
    lin = BasisLinear(D, V, codebook=book)
    emb = BasisEmbedding(V, D, codebook=book)
    x = torch.randn(T, D, requires_grad=True)
    ids = torch.randint(0, V, (T,))
    with LargestOutput():
        loss = lin(x).square().sum() + emb(ids).square().sum()
        loss.backward()
    assert T * V <= LargestOutput.largest < V * D


def test_tied_codebook_survives_to_half_and_state_dict():
    book = random_codebook()
    emb = BasisEmbedding(53, 24, codebook=book)
    lin = BasisLinear(24, 53, codebook=book)
    model = torch.nn.ModuleDict({"emb": emb, "head": lin}).half()
    assert model["emb"].codebook is model["head"].codebook
    assert model["emb"].codebook.codes.dtype == torch.uint8  # .half() leaves integer codes alone
    sd = model.state_dict()
    fresh_book = Codebook(53, 24, 4, 7)
    fresh = torch.nn.ModuleDict(
        {"emb": BasisEmbedding(53, 24, codebook=fresh_book), "head": BasisLinear(24, 53, codebook=fresh_book)}
    ).half()
    fresh.load_state_dict(sd)
    assert fresh["emb"].codebook.centroids is fresh["head"].codebook.centroids
    assert torch.equal(fresh["emb"].codebook.codes, book.codes)


def test_loading_out_of_range_codes_fails_clearly():
    book = random_codebook()
    sd = book.state_dict()
    sd["codes"] = sd["codes"].clone()
    sd["codes"][3, 1] = 7  # K = 7: valid codes are 0..6
    with pytest.raises(RuntimeError, match=r"codes .*num_clusters is 7"):
        random_codebook().load_state_dict(sd)
    sd["codes"] = torch.zeros(52, 4, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="shape"):
        random_codebook().load_state_dict(sd)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_basis": 5}, r"divisors: \[1, 2, 3, 4, 6, 8, 12, 24\]"),
        ({"num_clusters": 1}, r"num_clusters must be an integer in \[2, 53\]"),
        ({"num_clusters": 54}, r"num_clusters must be an integer in \[2, 53\]"),
    ],
)
def test_bad_shapes_name_the_argument(kwargs, match):
    args = {"num_basis": 4, "num_clusters": 7} | kwargs
    with pytest.raises(ValueError, match=match):
        BasisLinear(24, 53, **args)
