"""Progress of long work (the k-means of a large vocabulary, calibration passes), shown the way transformers shows
its own: transformers' tqdm, so `HF_HUB_DISABLE_PROGRESS_BARS=1` or `transformers.utils.logging.disable_progress_bar()`
hides the bars, and log lines on the "hf_basis" logger (INFO: `logging.getLogger("hf_basis").setLevel(logging.INFO)`;
the `hf-basis` command shows them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers.utils import logging as hf_logging

__all__ = ["iteration_callback", "progress_bar"]


def progress_bar(*args: Any, **kwargs: Any) -> Any:
    """tqdm(*args, **kwargs), an inert stand-in while transformers' progress bars are disabled (pass an iterable
    positionally: the stand-in iterates only over its first positional argument)."""
    return hf_logging.tqdm(*args, **kwargs)


def iteration_callback(bar: Any) -> Callable[[int, int], None]:
    """The `progress(done, total)` callback of `product_quantize` / `Codebook.from_weight`, moving `bar`."""
    state = {"done": 0}

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - state["done"])
        state["done"] = done

    return update
