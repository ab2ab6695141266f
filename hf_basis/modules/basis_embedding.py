"""BasisEmbedding: an nn.Embedding replacement whose table is a product-quantized Codebook."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hf_basis.modules.codebook import Codebook
from hf_basis.modules.decoded_weight import DecodedWeight
from hf_basis.ops.basis_embedding import basis_embedding
from hf_basis.ops.embedding_max_norm import renorm_rows

__all__ = ["BasisEmbedding"]


class BasisEmbedding(nn.Module):
    """Input embedding stored as `num_basis` integer codes per word plus trainable centroids.

    Args:
        num_embeddings: vocabulary size V.
        embedding_dim: D, divisible by `num_basis`.
        num_basis: B, sub-vectors per word.
        num_clusters: K, centroids per sub-space.
        padding_idx: if set, positions holding that id send no gradient to the centroids; the row keeps its value
            (nn.Embedding's semantics: a trained [PAD], or a pad id shared with eos / unk, is returned as it is).
        max_norm, norm_type: nn.Embedding's: looked-up rows of p-norm above max_norm are returned scaled down to it
            (`hf_basis.ops.embedding_max_norm`); the centroids themselves are not rewritten (other words share them).
        codebook: an existing Codebook to share (tied embeddings); its shape must match.

    Forward: input_ids (...) long -> (..., D) in the centroids' dtype. Only the centroids train; codes are fixed.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        num_basis: int = 8,
        num_clusters: int = 256,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        *,
        codebook: Codebook | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        codebook = Codebook.get_or_create(
            codebook, num_embeddings, embedding_dim, num_basis, num_clusters, device=device, dtype=dtype
        )
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx %= num_embeddings
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.codebook = codebook

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        num_basis: int,
        num_clusters: int,
        *,
        seed: int = 0,
        codebook: Codebook | None = None,
        sample_weight: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple["BasisEmbedding", float]:
        """Compress an nn.Embedding (k-means PQ of its weight). Returns the module and the relative error.

        Keeps padding_idx, max_norm and norm_type; a frozen embedding (weight.requires_grad False) gets frozen
        centroids. scale_grad_by_freq and sparse (gradient options) are refused: the centroids' gradient has neither.

        sample_weight: optional (num_embeddings,) non-negative weight per row, e.g. each token's training-set
        frequency: weighted k-means spends the codebook's accuracy on the rows used most (see
        `hf_basis.compress.pq.product_quantize`). Ignored when `codebook` is given (nothing is fitted then).
        progress: optional callback (k-means iterations done, expected total), for a progress bar.
        """
        if embedding.scale_grad_by_freq or embedding.sparse:
            raise ValueError(
                "BasisEmbedding supports neither scale_grad_by_freq nor sparse gradients; got "
                f"scale_grad_by_freq={embedding.scale_grad_by_freq}, sparse={embedding.sparse}: set both to False"
            )
        error = float("nan")
        if codebook is None:
            codebook, error = Codebook.from_weight(
                embedding.weight, num_basis, num_clusters, seed=seed, sample_weight=sample_weight, progress=progress
            )
            codebook.centroids.requires_grad_(embedding.weight.requires_grad)
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            max_norm=embedding.max_norm,
            norm_type=embedding.norm_type,
            codebook=codebook,
        )
        return module, error

    @property
    def weight(self) -> DecodedWeight:
        """The decoded dense (V, D) table. Built on every access: O(V*D) memory; for interop only.

        Read-only (in-place writes raise); `weight.requires_grad_(False)` freezes the centroids (see DecodedWeight).
        """
        return DecodedWeight.wrap(self.codebook.decode(), self, (self.codebook.centroids,))

    def resize_(self, num_embeddings: int, new_rows: torch.Tensor | None = None) -> None:
        """Keep the first `num_embeddings` rows or append `new_rows` (see `Codebook.resize_`); a padding_idx that
        no longer exists is dropped, as transformers does. With `new_rows=None` and a codebook that already has
        `num_embeddings` rows (a tied layer resized it), only this layer's attributes follow."""
        if self.codebook.num_embeddings != num_embeddings or new_rows is not None:
            self.codebook.resize_(num_embeddings, new_rows)
        self.num_embeddings = num_embeddings
        if self.padding_idx is not None and self.padding_idx >= num_embeddings:
            self.padding_idx = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = basis_embedding(input_ids, self.codebook.codes, self.codebook.centroids, self.padding_idx)
        return out if self.max_norm is None else renorm_rows(out, self.max_norm, self.norm_type)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            s += f", max_norm={self.max_norm}, norm_type={self.norm_type}"
        return s
