"""Codebook: the product-quantized representation of a V x D matrix, shared by BasisEmbedding and BasisLinear."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hf_basis.compress.activation_aware import refine_pq
from hf_basis.compress.pq import code_dtype, encode, product_quantize, reconstruct, relative_error
from hf_basis.validation import check_basis_shape, check_resize

__all__ = ["Codebook"]


class Codebook(nn.Module):
    """A V x D matrix stored as integer codes and trainable centroids (Shi & Yu 2018, product quantization).

    Row w of the matrix is `concat_b centroids[b, codes[w, b]]`; it is never stored.

    Args:
        num_embeddings: V, the number of rows (words).
        embedding_dim: D, the row width; must be divisible by `num_basis`.
        num_basis: B, sub-vectors per row.
        num_clusters: K, centroids per sub-space (2 .. 32768).

    Attributes:
        codes: (V, B) persistent buffer in the smallest integer dtype holding K (uint8 up to 256, else int16).
        centroids: (B, K, D // B) trainable parameter.

    A model whose input and output embeddings are tied holds ONE Codebook module referenced by both layers, so the
    tie is object identity: it survives `.to()`, `.half()` and state-dict round trips.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        num_basis: int,
        num_clusters: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_basis_shape(num_embeddings, embedding_dim, num_basis, num_clusters)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_basis = num_basis
        self.num_clusters = num_clusters
        self.register_buffer(
            "codes", torch.zeros(num_embeddings, num_basis, dtype=code_dtype(num_clusters), device=device)
        )
        self.centroids = nn.Parameter(
            torch.empty(num_basis, num_clusters, embedding_dim // num_basis, device=device, dtype=dtype)
        )
        nn.init.normal_(self.centroids, std=0.02)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        num_basis: int,
        num_clusters: int,
        *,
        seed: int = 0,
        sample_weight: torch.Tensor | None = None,
        input_moment: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple["Codebook", float]:
        """Product-quantize `weight` (V, D) with batched k-means on its device.

        sample_weight: optional (V,) non-negative row weights (e.g. token frequencies) for weighted k-means; see
        `hf_basis.compress.pq.product_quantize`.
        input_moment: optional (D, D) second moment E[h h^T] of the inputs that multiply the rows (an output layer's
            hidden states): the k-means result is then refined for the error of the outputs, not of the rows
            (`hf_basis.compress.activation_aware.refine_pq`).
        progress: optional callback (k-means iterations done, expected total); see `product_quantize`.

        Returns the codebook (centroids in weight's dtype) and the relative reconstruction error ||W - W_q|| / ||W||
        (unweighted, also when `sample_weight` is given).
        """
        V, D = weight.shape
        book = cls(V, D, num_basis, num_clusters, device=weight.device, dtype=weight.dtype)
        result = product_quantize(
            weight.detach(), num_basis, num_clusters, seed=seed, sample_weight=sample_weight, progress=progress
        )
        codes, centroids, error = result.codes, result.centroids, result.relative_error
        if input_moment is not None:
            codes, centroids, _ = refine_pq(weight, codes, centroids, input_moment, sample_weight)
            error = relative_error(weight, codes, centroids)
        with torch.no_grad():
            book.codes.copy_(codes)
            book.centroids.copy_(centroids)
        return book, error

    @classmethod
    def get_or_create(
        cls,
        codebook: "Codebook | None",
        num_embeddings: int,
        embedding_dim: int,
        num_basis: int,
        num_clusters: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "Codebook":
        """`codebook` when given (a shared one; its V x D must match), else a new one of this shape."""
        if codebook is None:
            return cls(num_embeddings, embedding_dim, num_basis, num_clusters, device=device, dtype=dtype)
        if (codebook.num_embeddings, codebook.embedding_dim) != (num_embeddings, embedding_dim):
            raise ValueError(
                f"codebook is {codebook.num_embeddings} x {codebook.embedding_dim}, "
                f"but the layer needs {num_embeddings} x {embedding_dim} (rows x width)"
            )
        return codebook

    def decode(self) -> torch.Tensor:
        """The dense (V, D) matrix. Costs O(V*D) memory and time: for interoperability and inspection only."""
        return reconstruct(self.codes, self.centroids)

    def resize_(self, num_embeddings: int, new_rows: torch.Tensor | None = None) -> None:
        """Keep the first `num_embeddings` rows, or append `new_rows` (num_embeddings - V, D), each stored as the
        codes of its nearest centroids (the centroids do not change). In place: every layer sharing this codebook
        sees the new rows. Refused, before anything changes, below `num_clusters` rows (the shape a checkpoint of
        this codebook must have)."""
        # At least num_clusters rows: the shape check every checkpoint of this codebook goes through.
        check_resize(num_embeddings, self.num_clusters, self.num_embeddings, self.embedding_dim, new_rows)
        codes = self.codes[:num_embeddings]
        if new_rows is not None and len(new_rows):
            codes = torch.cat([codes, encode(new_rows, self.centroids).to(codes.device)])
        self.codes = codes.contiguous()
        self.num_embeddings = num_embeddings

    def nbytes(self) -> int:
        """Storage of the codebook: codes + centroids, in bytes."""
        return self.codes.numel() * self.codes.element_size() + self.centroids.numel() * self.centroids.element_size()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # Reject codes that would index outside the centroid table: silently loading them would give garbage
        # (CPU) or a device-side assert much later (CUDA).
        codes = state_dict.get(prefix + "codes")
        if codes is not None:
            if codes.shape != self.codes.shape:
                errors.append(
                    f"{prefix}codes has shape {tuple(codes.shape)}, expected {tuple(self.codes.shape)} "
                    f"(num_embeddings, num_basis)"
                )
            elif codes.is_floating_point() or codes.is_complex():
                errors.append(f"{prefix}codes must be an integer tensor, got {codes.dtype}")
            elif codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_clusters):
                errors.append(
                    f"{prefix}codes hold values in [{int(codes.min())}, {int(codes.max())}] but num_clusters is "
                    f"{self.num_clusters}: every code must lie in [0, {self.num_clusters})"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"num_basis={self.num_basis}, num_clusters={self.num_clusters}, codes_dtype={self.codes.dtype}"
        )
