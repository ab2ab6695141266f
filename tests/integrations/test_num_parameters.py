"""`model.num_parameters(exclude_embeddings=True)` (used by the Trainer's FLOP count) on converted models.

transformers leaves out the weight of every nn.Embedding; a compressed input embedding's centroids must be left out
the same way, and nothing else: the reference is the dense model's count (tied) or a count by module name (untied).
"""

import pytest

import hf_basis
from tiny_models import tiny_model


def converted(tie: bool, method: str = "basis"):
    kwargs = {"num_basis": 4, "num_clusters": 16} if method == "basis" else {"method": "quant", "nbit": 4}
    return hf_basis.convert(tiny_model("llama", tie=tie), **kwargs)


@pytest.mark.parametrize("method", ["basis", "quant"])
def test_tied_model_counts_the_same_non_embedding_parameters_as_the_dense_one(method):
    dense = tiny_model("llama", tie=True)
    model = converted(True, method)
    assert model.num_parameters(exclude_embeddings=True) == dense.num_parameters(exclude_embeddings=True)


def test_untied_model_leaves_out_the_embedding_codebook_only():
    model = converted(False)
    by_name = {name: p.numel() for name, p in model.named_parameters()}
    embedding = by_name["model.embed_tokens.codebook.centroids"]
    assert model.num_parameters(exclude_embeddings=True) == sum(by_name.values()) - embedding
    assert model.num_parameters() == sum(by_name.values())
    # The head's codebook stays counted, as a dense lm_head's weight does.
    assert "lm_head.codebook.centroids" in by_name
    model.lm_head.weight.requires_grad_(False)
    assert model.num_parameters(only_trainable=True, exclude_embeddings=True) == (
        sum(by_name.values()) - embedding - by_name["lm_head.codebook.centroids"]
    )
