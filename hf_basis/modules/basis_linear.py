"""BasisLinear: an output layer (lm_head) whose V x H weight is a product-quantized Codebook."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hf_basis.modules.codebook import Codebook
from hf_basis.modules.decoded_weight import DecodedWeight
from hf_basis.modules.lazy_logits import LazyLogits, traced_head_logits
from hf_basis.modules.resize import resize_bias_
from hf_basis.ops.basis_linear import basis_linear

__all__ = ["BasisLinear"]


class BasisLinear(nn.Module):
    """logits = x @ W^T + bias with W (V x H) stored as codes + centroids and never built.

    logits[t, w] = bias[w] + sum_b P[b, code[w, b], t] with P_b = C_b @ x_b^T: a small bmm (T x K x H flops)
    plus a gather-sum over B codes per logit, instead of the T x V x H GEMM. On CUDA the gather-sum and its backward
    run as Triton kernels; elsewhere as PyTorch ops (`HF_BASIS_DISABLE_TRITON=1` forces those everywhere).

    Args:
        in_features: H, divisible by `num_basis`.
        out_features: V.
        num_basis, num_clusters: B and K of the codebook.
        bias: learn a per-word bias.
        codebook: an existing Codebook to share (tied input/output embeddings).

    Forward: x (..., H) -> (..., V) in x's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_basis: int = 8,
        num_clusters: int = 256,
        bias: bool = True,
        *,
        codebook: Codebook | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # The weight is V x H: out_features rows of width in_features.
        codebook = Codebook.get_or_create(
            codebook, out_features, in_features, num_basis, num_clusters, device=device, dtype=dtype
        )
        self.in_features = in_features
        self.out_features = out_features
        self.codebook = codebook
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or codebook.centroids.dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        num_basis: int,
        num_clusters: int,
        *,
        seed: int = 0,
        codebook: Codebook | None = None,
        sample_weight: torch.Tensor | None = None,
        input_moment: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple["BasisLinear", float]:
        """Compress an nn.Linear(H, V) (k-means PQ of its weight). Returns the module and the relative error.

        Pass `codebook` to reuse the input embedding's codebook (tied weights); the bias is copied.
        sample_weight: optional (out_features,) non-negative weight per output row, e.g. each token's training-set
        frequency, for weighted k-means (see `hf_basis.compress.pq.product_quantize`). Ignored when `codebook` is
        given (nothing is fitted then).
        input_moment: optional (H, H) second moment E[x x^T] of the layer's inputs: fit the codebook to the error of
        the outputs (`hf_basis.compress.activation_aware`). Not with `codebook`.
        A frozen layer (weight / bias with requires_grad False) gets frozen centroids / bias.
        progress: optional callback (k-means iterations done, expected total), for a progress bar.
        """
        error = float("nan")
        if codebook is None:
            codebook, error = Codebook.from_weight(
                linear.weight, num_basis, num_clusters, seed=seed, sample_weight=sample_weight,
                input_moment=input_moment, progress=progress,
            )
            codebook.centroids.requires_grad_(linear.weight.requires_grad)
        elif input_moment is not None:
            raise ValueError("input_moment fits a new codebook; a given (shared) codebook is used as it is")
        module = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, codebook=codebook,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        if linear.bias is not None:
            with torch.no_grad():
                module.bias.copy_(linear.bias)
            module.bias.requires_grad_(linear.bias.requires_grad)
        return module, error

    @property
    def weight(self) -> DecodedWeight:
        """The decoded dense (V, H) weight. Built on every access: O(V*H) memory; for interop only.

        Read-only (in-place writes raise); `weight.requires_grad_(False)` freezes the centroids, not the bias, as it
        freezes an nn.Linear's weight and not its bias (see DecodedWeight).
        """
        return DecodedWeight.wrap(self.codebook.decode(), self, (self.codebook.centroids,))

    def resize_(
        self, out_features: int, new_rows: torch.Tensor | None = None, new_bias: torch.Tensor | None = None
    ) -> None:
        """Keep the first `out_features` output rows or append `new_rows` (see `Codebook.resize_`) and `new_bias`
        (zeros if None). With `new_rows=None` and a codebook that already has `out_features` rows (the tied
        embedding resized it), only the bias and this layer's attributes follow."""
        if self.codebook.num_embeddings != out_features or new_rows is not None:
            self.codebook.resize_(out_features, new_rows)
        if self.bias is not None:
            resize_bias_(self.bias, out_features, new_bias)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centroids = self.codebook.centroids
        bias = self.bias
        if x.dtype != centroids.dtype:
            # Mixed precision (e.g. fp32 centroids under bf16 activations): compute in the activations' dtype,
            # as nn.Linear does under autocast.
            centroids = centroids.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        if self.training and getattr(self, "lazy_logits", False) and torch.is_grad_enabled():
            # Armed by hf_basis.integrations.fused_loss for a training call with labels: the installed loss fuses
            # these logits; any other use computes them (see hf_basis/modules/lazy_logits.py). Dynamo cannot trace
            # the subclass: under torch.compile / torch.export the real logits carry the inputs instead.
            if torch.compiler.is_compiling():
                return traced_head_logits(x, centroids, self.codebook.codes, bias)
            return LazyLogits(x, centroids, self.codebook.codes, bias)
        return basis_linear(x, centroids, self.codebook.codes, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
