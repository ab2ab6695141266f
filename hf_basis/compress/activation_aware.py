"""Activation-aware refinement of a product quantization: fit the codes and centroids to the layer's outputs.

Plain k-means (pq.py) makes the rows of W close in Euclidean distance. An output layer is judged by its logits
l = W h + bias, and the logit error of row w is e_w . h with e_w = w - w^. Its mean square over the inputs is

    E[(e_w . h)^2] = e_w^T M e_w,        M = E[h h^T]  (the (D, D) second moment of the layer's input)

so the quantization that matters minimises  sum_w f_w e_w^T M e_w  (f_w: optional row weights such as token
frequencies). With M = I this is k-means' objective; a real M weighs the directions the hidden states actually use
and couples the sub-spaces (a sub-space's error can be offset by another's where M has cross terms).

`refine_pq` starts from a k-means result and alternates, one sub-space b at a time with the others fixed,

    codes:      code[w, b] = argmin_k  c_k^T M_bb c_k - 2 c_k . (M r_w)_b     (r_w: row w minus the other sub-spaces)
    centroids:  M_bb c_k = weighted mean of (M r_w)_b over the rows with code k   (a d x d solve)

Each step is exact for its variables, so the objective never increases (returned per sweep). The error E = W - W^
and E M are updated incrementally: a sweep costs O(V D^2) plus the distance blocks, chunked over V.
"""

from __future__ import annotations

import torch

from hf_basis.compress.pq import _ieee_fp32_matmul, reconstruct

__all__ = ["refine_pq", "weighted_output_error"]

_CHUNK_ELEMENTS = 2**25  # one (chunk, K) fp32 distance block
_RIDGE = 1e-6  # relative to the mean diagonal of M: keeps every M_bb invertible (dead units, tiny samples)


def _prepare_moment(moment: torch.Tensor, dim: int, device: torch.device) -> torch.Tensor:
    M = moment.to(device=device, dtype=torch.float32)
    M = 0.5 * (M + M.T)
    scale = float(M.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny))
    return M + _RIDGE * scale * torch.eye(dim, device=device)


def weighted_output_error(
    weight: torch.Tensor, approx: torch.Tensor, moment: torch.Tensor, sample_weight: torch.Tensor | None = None
) -> float:
    """sum_w f_w (w - w^)^T M (w - w^), f = sample_weight (ones if None): the objective `refine_pq` minimises."""
    E = (weight.float() - approx.float()).to(weight.device)
    f = torch.ones(E.shape[0], device=E.device) if sample_weight is None else sample_weight.to(E)
    return _objective(E, E @ moment.to(E).T, f)


def _objective(E: torch.Tensor, EM: torch.Tensor, f: torch.Tensor) -> float:
    """sum_w f_w e_w . (M e_w), given the error rows E and E @ M."""
    return float(((E * EM).sum(dim=1) * f).sum())


def refine_pq(
    weight: torch.Tensor,
    codes: torch.Tensor,
    centroids: torch.Tensor,
    moment: torch.Tensor,
    sample_weight: torch.Tensor | None = None,
    sweeps: int = 5,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Refine a product quantization of `weight` (V, D) for inputs with second moment `moment` (D, D).

    codes (V, B) integer and centroids (B, K, D/B) as from `product_quantize`; sample_weight: optional (V,)
    non-negative row weights. Runs on weight's device in float32. Returns new codes (codes' dtype), new centroids
    (centroids' dtype) and the objective (`weighted_output_error` up to a 1e-6 relative ridge on M), before and after
    every sweep: non-increasing.
    """
    V, D = weight.shape
    B, K, d = centroids.shape
    if codes.shape != (V, B) or B * d != D:
        raise ValueError(f"codes {tuple(codes.shape)} / centroids {tuple(centroids.shape)} do not fit weight {(V, D)}")
    if moment.shape != (D, D):
        raise ValueError(f"moment must be ({D}, {D}) (the second moment of the layer's input), got {tuple(moment.shape)}")
    if sweeps < 0:
        raise ValueError(f"sweeps must be >= 0, got {sweeps}")
    with torch.no_grad(), _ieee_fp32_matmul(weight.device):  # no TF32: the steps must be exact for the monotonicity
        return _refine(weight, codes, centroids, moment, sample_weight, sweeps)


def _refine(weight, codes, centroids, moment, sample_weight, sweeps):
    V, D = weight.shape
    B, K, d = centroids.shape
    dev = weight.device
    W = weight.detach().float()
    M = _prepare_moment(moment, D, dev)
    f = torch.ones(V, device=dev) if sample_weight is None else sample_weight.to(dev, torch.float32)
    code = codes.to(dev).long().clone()
    C = centroids.detach().to(dev).float().clone()

    E = W - reconstruct(code, C)
    EM = E @ M
    history = [_objective(E, EM, f)]
    chunk = max(1, _CHUNK_ELEMENTS // K)
    for _ in range(sweeps):
        for b in range(B):
            sl = slice(b * d, (b + 1) * d)
            Mbb = M[sl, sl]
            old = C[b][code[:, b]]  # (V, d)
            target = EM[:, sl] + old @ Mbb  # (M r_w)_b: the error with this sub-space's part put back
            quad = ((C[b] @ Mbb) * C[b]).sum(dim=1)  # c_k^T M_bb c_k
            for start in range(0, V, chunk):
                rows = slice(start, start + chunk)
                code[rows, b] = (quad[None, :] - 2.0 * target[rows] @ C[b].T).argmin(dim=1)
            num = torch.zeros(K, d, device=dev).index_add_(0, code[:, b], target * f[:, None])
            den = torch.zeros(K, device=dev).index_add_(0, code[:, b], f)
            used = den > 0  # an empty cluster keeps its centroid
            if bool(used.any()):
                C[b][used] = torch.linalg.solve(Mbb, (num[used] / den[used, None]).T).T
            delta = C[b][code[:, b]] - old
            E[:, sl] -= delta
            EM -= delta @ M[sl, :]
        history.append(_objective(E, EM, f))
    return code.to(codes.dtype), C.to(centroids.dtype), history
