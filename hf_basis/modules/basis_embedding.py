"""BasisEmbedding: an nn.Embedding replacement whose table is a product-quantized Codebook."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hf_basis.modules.codebook import Codebook
from hf_basis.ops.basis_embedding import basis_embedding

__all__ = ["BasisEmbedding"]


class BasisEmbedding(nn.Module):
    """Input embedding stored as `num_basis` integer codes per word plus trainable centroids.

    Args:
        num_embeddings: vocabulary size V.
        embedding_dim: D, divisible by `num_basis`.
        num_basis: B, sub-vectors per word.
        num_clusters: K, centroids per sub-space.
        padding_idx: if set, that row's output is exactly zero and gets no gradient (as in nn.Embedding).
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

        sample_weight: optional (num_embeddings,) non-negative weight per row, e.g. each token's training-set
        frequency: weighted k-means spends the codebook's accuracy on the rows used most (see
        `hf_basis.compress.pq.product_quantize`). Ignored when `codebook` is given (nothing is fitted then).
        progress: optional callback (k-means iterations done, expected total), for a progress bar.
        """
        error = float("nan")
        if codebook is None:
            codebook, error = Codebook.from_weight(
                embedding.weight, num_basis, num_clusters, seed=seed, sample_weight=sample_weight, progress=progress
            )
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            codebook=codebook,
        )
        return module, error

    @property
    def weight(self) -> torch.Tensor:
        """The decoded dense (V, D) table, read-only. Built on every access: O(V*D) memory; for interop only."""
        w = self.codebook.decode()
        if self.padding_idx is not None:
            w = w.index_fill(0, torch.tensor([self.padding_idx], device=w.device), 0)
        return w

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return basis_embedding(input_ids, self.codebook.codes, self.codebook.centroids, self.padding_idx)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s
