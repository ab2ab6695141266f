"""Host-side integer helpers for Triton launch grids and block sizes.

`triton.cdiv` and `triton.next_power_of_2` are `constexpr_function`s since triton 3.5: every call from host code
unwraps its arguments through Triton's constexpr machinery, ~4 us each on a busy CPU, and the fused loss computes a
dozen of them per call. These plain versions cost ~0.1 us and give the same integers.
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
