"""Helpers shared by the benchmark scripts: device names, result-file names, copy bandwidth, CUDA-graph capture."""

from __future__ import annotations

import platform
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str) -> str:
    """GPU name for CUDA, else the CPU model from /proc/cpuinfo (platform.processor() where that is missing)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def result_path(prefix: str, device: torch.device | str) -> Path:
    """benchmarks/results/<prefix>_<device slug>.json; every CPU is "cpu" (its model is inside the JSON)."""
    device = torch.device(device)
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return RESULTS / f"{prefix}_{slug}.json"


def copy_bandwidth(device: torch.device | str, time_ms: Callable[[Callable[[], object]], float], mib: int = 1024) -> float:
    """Bytes read + written per second by a device-to-device copy of a `mib`-MiB tensor, timed with `time_ms`."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def capture_graph(fn: Callable[[], object], params: Sequence[torch.Tensor] = ()) -> torch.cuda.CUDAGraph:
    """fn captured in one CUDA graph, after three warm-up calls on a side stream (compilation, caches and cuBLAS
    workspaces stay out of the capture). The gradients of `params` are set to None before every call and after the
    capture: the graph keeps its own gradient buffers."""

    def call():
        for p in params:
            p.grad = None
        fn()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for p in params:
        p.grad = None
    return graph
