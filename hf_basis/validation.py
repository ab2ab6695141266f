"""Argument checks shared by the public constructors and `convert`: one wording for each mistake."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "ALLOWED_NBITS", "MAX_CLUSTERS", "as_row_weights", "check_basis_shape", "check_bool", "check_choice", "check_nbit",
    "check_seed", "divisors", "is_int",
]  # fmt: skip

ALLOWED_NBITS = (1, 2, 4, 8, 16, 32)
MAX_CLUSTERS = 32768  # codes are stored as int16 above 256 clusters


def is_int(x: object) -> bool:
    """A Python integer, not a bool (True == 1 would pass every range check and then break a tensor call)."""
    return isinstance(x, int) and not isinstance(x, bool)


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending."""
    return [k for k in range(1, n + 1) if n % k == 0]


def check_basis_shape(num_embeddings: int, embedding_dim: int, num_basis: int, num_clusters: int) -> None:
    """Raise ValueError naming the argument and the allowed values when a basis codebook cannot have this shape."""
    if not is_int(num_basis) or num_basis < 1:
        raise ValueError(f"num_basis must be a positive integer, got {num_basis!r}")
    if embedding_dim % num_basis != 0:
        raise ValueError(
            f"num_basis={num_basis} does not divide the hidden size {embedding_dim}; "
            f"num_basis must be one of its divisors: {divisors(embedding_dim)}"
        )
    if not is_int(num_clusters) or not 2 <= num_clusters <= min(num_embeddings, MAX_CLUSTERS):
        raise ValueError(
            f"num_clusters must be an integer in [2, {min(num_embeddings, MAX_CLUSTERS)}] "
            f"(at least 2, at most the vocabulary size {num_embeddings} and at most {MAX_CLUSTERS}), got {num_clusters!r}"
        )


def check_resize(num_embeddings: int, minimum: int, rows: int, width: int, new_rows: torch.Tensor | None) -> None:
    """Raise ValueError unless a (rows, width) table can become `num_embeddings` rows (an int >= minimum) with
    `new_rows`: None when it does not grow, else a (num_embeddings - rows, width) tensor."""
    if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) or num_embeddings < minimum:
        raise ValueError(f"the new number of rows must be an integer >= {minimum}, got {num_embeddings!r}")
    expected = (max(num_embeddings - rows, 0), width)
    if (new_rows is None and num_embeddings > rows) or (new_rows is not None and tuple(new_rows.shape) != expected):
        got = None if new_rows is None else tuple(new_rows.shape)
        raise ValueError(f"resizing {rows} rows to {num_embeddings} needs new_rows of shape {expected}, got {got}")


def check_nbit(nbit: int) -> None:
    """Raise ValueError unless nbit is one of the SmallFry bit widths."""
    if not is_int(nbit) or nbit not in ALLOWED_NBITS:
        raise ValueError(f"nbit must be one of {list(ALLOWED_NBITS)}, got {nbit!r}")


def check_choice(value: object, name: str, choices: Sequence[str]) -> None:
    """Raise ValueError unless `value` is one of the strings `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_bool(value: object, name: str) -> None:
    """Raise ValueError unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_seed(seed: object, *, allow_none: bool = False) -> None:
    """Raise ValueError unless `seed` is an integer (or None where that means unseeded)."""
    if not (is_int(seed) or (allow_none and seed is None)):
        raise ValueError(f"seed must be an integer{' or None' if allow_none else ''}, got {seed!r}")


def as_row_weights(values: torch.Tensor | Sequence[float], name: str) -> torch.Tensor:
    """`values` as a detached float64 tensor after the checks any per-row weight needs (real, finite, >= 0, not all
    zero). Raises ValueError naming the argument `name`; the caller checks the shape it expects.

    float64: large integer counts and tiny probabilities both stay exact enough for the checks and a later rescaling.
    """
    try:
        w = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a tensor or sequence of non-negative numbers: {e}") from None
    if w.dtype == torch.bool or w.is_complex():
        raise ValueError(f"{name} must hold real numbers (counts or probabilities), got {w.dtype}")
    w = w.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or infinite values; weights must be finite")
    if bool((w < 0).any()):
        raise ValueError(f"{name} must be non-negative, got a minimum of {float(w.min())}")
    if not bool((w > 0).any()):
        raise ValueError(f"{name} is all zero: at least one entry must be positive")
    return w
