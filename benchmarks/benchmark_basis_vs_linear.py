"""Basis output layer vs a dense nn.Linear(H, V): forward and forward+backward time, side by side in one run.

    python benchmarks/benchmark_basis_vs_linear.py --tokens 128 --hidden-sizes 2048 4096 \
        --vocab-sizes 50000 100000 150000 200000 --num-basis 8 --clusters 384 --dtype float16
    python benchmarks/benchmark_basis_vs_linear.py --device cpu          # T=256, H=512, V=10000, 8 x 256, fp32

"Basis linear" is the whole module path: projection bmm (x -> P: (B, K, T)) + decode + bias, i.e.
`hf_basis.ops.basis_linear.basis_linear`. Inputs are random (never zeros), codes uniform in [0, K).

CUDA timings are medians of `triton.testing.do_bench` (warm-up excluded, L2 flushed before every call; a call
whose host side takes longer than that flush is timed at its host pace). fwd+bwd = forward + backward with a fixed
random grad_output, grads set to None before each call. The decode kernel's forward time is also given as a multiple of the
time to write the logits once (T*V*elem bytes) at the copy bandwidth measured in the same run ((read+write)/time of a
1 GiB device copy). CUDA-graph columns (`--cuda-graphs`, on by default) replay the same work as one graph; they are
the GPU time of the work and the headline at 128 tokens: there the eager columns are paced by the host (Python,
autograd, Triton's launcher), whose time to issue one basis call is given too (`host ... us`, CPU time of 50 calls
issued back to back without synchronising). "floor us" is the same for an autograd Function that only clones its
input (autograd's own cost); "1thr" columns repeat both with `torch.autograd.set_multithreading_enabled(False)`, the
backward then running on the calling thread instead of being handed to autograd's CUDA worker thread.
The forward's parts are timed the same way, each as its own graph (second table): the projection bmm, the decode
kernel on a precomputed P, a trivial kernel writing the same T x V logits (`fill_`: the floor of any decode), and a
one-element `fill_` (the fixed cost of one timed replay: launch, events and the tail of the L2 flush): where the
forward's time goes.

CPU timings: median of perf_counter loops after warm-up, dense and basis timed in alternation.
Writes benchmarks/results/basis_vs_linear_<device-slug>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_utils import capture_graph, copy_bandwidth, result_path
from bench_utils import device_name as bench_device_name

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:  # the module path; fall back to composing it (same computation) if the module is not there
    from hf_basis.ops.basis_linear import basis_linear
except ImportError:  # pragma: no cover
    from hf_basis.ops.basis_decode import basis_decode

    def basis_linear(x, centroids, codes, bias=None):
        T, (B, _, d) = x.shape[0], centroids.shape
        return basis_decode(torch.bmm(centroids, x.view(T, B, d).permute(1, 2, 0)), codes, bias)


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def make_case(T, H, V, B, K, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    d = H // B
    x = torch.randn(T, H, generator=g).to(device, dtype).requires_grad_()
    linear = torch.nn.Linear(H, V, device=device, dtype=dtype)  # random (kaiming-uniform) init
    centroids = (torch.randn(B, K, d, generator=g) / H**0.5).to(device, dtype).requires_grad_()
    codes = torch.randint(0, K, (V, B), generator=g).to(torch.uint8 if K <= 256 else torch.int16).to(device)
    bias = (torch.randn(V, generator=g) * 0.02).to(device, dtype).requires_grad_()
    grad_out = torch.randn(T, V, generator=g).to(device, dtype)
    return x, linear, centroids, codes, bias, grad_out


# ----------------------------------------------------------------------------------------------------------------- CUDA


def _do_bench(fn, grad_to_none=None):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def _host_us(fn, params, calls=50):
    """CPU time to issue one call (microseconds): `calls` calls back to back without synchronising. Few enough calls
    that the launch queue never fills, so a GPU-bound call is not counted at its GPU time."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        for p in params:
            p.grad = None
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


class _Clone(torch.autograd.Function):
    """The least an eager autograd forward + backward can do: autograd's own cost, the floor under host_basis_*."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def _graph_ms(fn, params):
    """Capture fn (forward, or forward+backward) in one CUDA graph and time its replay."""
    graph = capture_graph(fn, params)
    ms = _do_bench(graph.replay)
    del graph
    return ms


def bench_cuda_row(T, H, V, B, K, dtype, device, cuda_graphs=True, copy_bw=None):
    from hf_basis.ops.basis_decode_triton import basis_decode_backward_triton, basis_decode_triton

    x, linear, C, codes, bias, grad_out = make_case(T, H, V, B, K, dtype, device)
    dense_params = [x, linear.weight, linear.bias]
    basis_params = [x, C, bias]

    def dense_fwd():
        return linear(x)

    def basis_fwd():
        return basis_linear(x, C, codes, bias)

    def dense_step():
        linear(x).backward(grad_out)

    def basis_step():
        basis_linear(x, C, codes, bias).backward(grad_out)

    # correctness guard: the basis path must equal the dense layer built from the same codebook
    with torch.no_grad():
        W = torch.cat([C[b][codes[:, b].long()] for b in range(B)], dim=1)
        ref = torch.nn.functional.linear(x.float(), W.float(), bias.float())
        err = ((basis_fwd().float() - ref).norm() / ref.norm()).item()
        del W, ref

    row = {"T": T, "H": H, "V": V, "num_basis": B, "clusters": K, "basis_rel_err_vs_dense_fp32": err}
    row["dense_fwd_ms"] = _do_bench(dense_fwd)
    row["basis_fwd_ms"] = _do_bench(basis_fwd)
    row["dense_fwd_bwd_ms"] = _do_bench(dense_step, grad_to_none=dense_params)
    row["basis_fwd_bwd_ms"] = _do_bench(basis_step, grad_to_none=basis_params)
    row["fwd_speedup"] = row["dense_fwd_ms"] / row["basis_fwd_ms"]
    row["fwd_bwd_speedup"] = row["dense_fwd_bwd_ms"] / row["basis_fwd_bwd_ms"]
    # what paces the eager basis columns when they exceed the graph replay: the host issuing the work
    row["host_basis_fwd_us"] = _host_us(basis_fwd, [])
    row["host_basis_fwd_bwd_us"] = _host_us(basis_step, basis_params)
    # autograd's floor: a Function that only clones, forward + backward; and both again with the backward run on
    # this thread (no hand-off to autograd's CUDA worker thread, which dominates the floor on some machines)
    small, small_grad = x.detach()[:1].clone().requires_grad_(True), x.detach()[:1].clone()

    def floor_step():
        _Clone.apply(small).backward(small_grad)

    row["host_autograd_floor_us"] = _host_us(floor_step, [small])
    with torch.autograd.set_multithreading_enabled(False):
        row["host_basis_fwd_bwd_1thread_us"] = _host_us(basis_step, basis_params)
        row["host_autograd_floor_1thread_us"] = _host_us(floor_step, [small])

    # parts, for the record
    with torch.no_grad():
        P = torch.bmm(C, x.view(T, B, H // B).permute(1, 2, 0)).contiguous()
    row["bmm_fwd_ms"] = _do_bench(lambda: torch.bmm(C, x.view(T, B, H // B).permute(1, 2, 0)))
    row["decode_fwd_ms"] = _do_bench(lambda: basis_decode_triton(P, codes, bias))
    row["decode_bwd_ms"] = _do_bench(lambda: basis_decode_backward_triton(grad_out, codes, K, True, dtype, dtype))
    # how much of the host's issue time is the Triton launches alone (1 forward, 2 backward kernels)
    row["host_decode_fwd_us"] = _host_us(lambda: basis_decode_triton(P, codes, bias), [])
    row["host_decode_bwd_us"] = _host_us(
        lambda: basis_decode_backward_triton(grad_out, codes, K, True, dtype, dtype), [])
    if copy_bw:
        row["logits_write_ms"] = T * V * grad_out.element_size() / copy_bw * 1e3
        row["decode_over_write"] = row["decode_fwd_ms"] / row["logits_write_ms"]

    with torch.no_grad():  # again after thousands of launches: still the same function
        W = torch.cat([C[b][codes[:, b].long()] for b in range(B)], dim=1)
        ref = torch.nn.functional.linear(x.float(), W.float(), bias.float())
        row["basis_rel_err_after_timing"] = ((basis_fwd().float() - ref).norm() / ref.norm()).item()
        del W, ref

    if cuda_graphs:
        try:
            with torch.no_grad():
                row["graph_dense_fwd_ms"] = _graph_ms(dense_fwd, [])
                row["graph_basis_fwd_ms"] = _graph_ms(basis_fwd, [])
            row["graph_dense_fwd_bwd_ms"] = _graph_ms(dense_step, dense_params)
            row["graph_basis_fwd_bwd_ms"] = _graph_ms(basis_step, basis_params)
            row["graph_fwd_speedup"] = row["graph_dense_fwd_ms"] / row["graph_basis_fwd_ms"]
            row["graph_fwd_bwd_speedup"] = row["graph_dense_fwd_bwd_ms"] / row["graph_basis_fwd_bwd_ms"]
            with torch.no_grad():  # the forward's parts, each its own graph, timed the same way
                row["graph_bmm_fwd_ms"] = _graph_ms(lambda: torch.bmm(C, x.view(T, B, H // B).permute(1, 2, 0)), [])
                row["graph_decode_fwd_ms"] = _graph_ms(lambda: basis_decode_triton(P, codes, bias), [])
                row["graph_write_floor_ms"] = _graph_ms(lambda: torch.empty_like(grad_out).fill_(1.0), [])
                row["graph_replay_floor_ms"] = _graph_ms(lambda: torch.empty_like(grad_out[:1, :1]).fill_(1.0), [])
        except Exception as exc:  # report, never hide the eager numbers
            row["graph_error"] = repr(exc)
    del x, linear, C, codes, bias, grad_out, P
    torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------------------------ CPU


def _median_ms_interleaved(fns, min_time=2.0, warmup=3, max_rounds=100):
    """Median ms of each fn, timed in alternation (a shared CPU's load then hits every fn alike)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < max_rounds and (time.perf_counter() - start < min_time or len(times[0]) < 9):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e3 for ts in times]


def bench_cpu_row(T, H, V, B, K, dtype):
    x, linear, C, codes, bias, grad_out = make_case(T, H, V, B, K, dtype, "cpu")
    dense_params = [x, linear.weight, linear.bias]
    basis_params = [x, C, bias]

    def dense_step():
        for p in dense_params:
            p.grad = None
        linear(x).backward(grad_out)

    def basis_step():
        for p in basis_params:
            p.grad = None
        basis_linear(x, C, codes, bias).backward(grad_out)

    row = {"T": T, "H": H, "V": V, "num_basis": B, "clusters": K, "threads": torch.get_num_threads()}
    with torch.no_grad():  # correctness guard, as on CUDA
        W = torch.cat([C[b][codes[:, b].long()] for b in range(B)], dim=1)
        ref = torch.nn.functional.linear(x, W, bias)
        row["basis_rel_err_vs_dense"] = ((basis_linear(x, C, codes, bias) - ref).norm() / ref.norm()).item()
    row["dense_fwd_ms"], row["basis_fwd_ms"] = _median_ms_interleaved(
        [lambda: linear(x), lambda: basis_linear(x, C, codes, bias)]
    )
    row["dense_fwd_bwd_ms"], row["basis_fwd_bwd_ms"] = _median_ms_interleaved([dense_step, basis_step])
    row["fwd_speedup"] = row["dense_fwd_ms"] / row["basis_fwd_ms"]
    row["fwd_bwd_speedup"] = row["dense_fwd_bwd_ms"] / row["basis_fwd_bwd_ms"]
    return row


# ----------------------------------------------------------------------------------------------------------------- main


def _print_table(rows, device_name, graphs):
    cols = [
        ("H", "H", "{:>5}"),
        ("V", "V", "{:>7}"),
        ("dense_fwd_ms", "dense fwd", "{:>9.4f}"),
        ("basis_fwd_ms", "basis fwd", "{:>9.4f}"),
        ("fwd_speedup", "fwd x", "{:>6.2f}"),
        ("dense_fwd_bwd_ms", "dense f+b", "{:>9.4f}"),
        ("basis_fwd_bwd_ms", "basis f+b", "{:>9.4f}"),
        ("fwd_bwd_speedup", "f+b x", "{:>6.2f}"),
        ("decode_fwd_ms", "decode", "{:>7.4f}"),
        ("decode_over_write", "dec/wr", "{:>6.2f}"),
        ("decode_bwd_ms", "dec bwd", "{:>7.4f}"),
        ("host_basis_fwd_us", "host fwd us", "{:>11.0f}"),
        ("host_basis_fwd_bwd_us", "host f+b us", "{:>11.0f}"),
        ("host_autograd_floor_us", "floor us", "{:>8.0f}"),
        ("host_basis_fwd_bwd_1thread_us", "f+b 1thr us", "{:>11.0f}"),
        ("host_autograd_floor_1thread_us", "floor 1thr", "{:>10.0f}"),
    ]
    if graphs:
        cols += [("graph_fwd_speedup", "g fwd x", "{:>7.2f}"), ("graph_fwd_bwd_speedup", "g f+b x", "{:>7.2f}")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    print(f"device: {device_name}")
    _print_columns(rows, cols)
    if graphs and any("graph_decode_fwd_ms" in r for r in rows):
        print("forward, each part its own CUDA graph (ms):")
        _print_columns(rows, [
            ("H", "H", "{:>5}"),
            ("V", "V", "{:>7}"),
            ("graph_dense_fwd_ms", "dense fwd", "{:>9.4f}"),
            ("graph_basis_fwd_ms", "basis fwd", "{:>9.4f}"),
            ("graph_bmm_fwd_ms", "bmm", "{:>7.4f}"),
            ("graph_decode_fwd_ms", "decode", "{:>7.4f}"),
            ("graph_write_floor_ms", "write floor", "{:>11.4f}"),
            ("graph_replay_floor_ms", "replay floor", "{:>12.4f}"),
        ])


def _print_columns(rows, cols):
    print(" ".join(f"{title:>{len(fmt.format(0))}}" for _, title, fmt in cols))
    for r in rows:
        print(" ".join(fmt.format(r[key]) if key in r else " " * len(fmt.format(0)) for key, _, fmt in cols))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--tokens", type=int, default=None, help="default 128 (cuda) / 256 (cpu)")
    ap.add_argument("--hidden-sizes", type=int, nargs="+", default=None, help="default 2048 4096 / 512")
    ap.add_argument("--vocab-sizes", type=int, nargs="+", default=None, help="default 50k..200k / 10000")
    ap.add_argument("--num-basis", type=int, default=8)
    ap.add_argument("--clusters", type=int, default=None, help="default 384 (cuda) / 256 (cpu)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default float16 (cuda) / float32 (cpu)")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    cpu = args.device == "cpu"
    args.tokens = args.tokens or (256 if cpu else 128)
    args.hidden_sizes = args.hidden_sizes or ([512] if cpu else [2048, 4096])
    args.vocab_sizes = args.vocab_sizes or ([10000] if cpu else [50000, 100000, 150000, 200000])
    args.clusters = args.clusters or (256 if cpu else 384)
    args.dtype = args.dtype or ("float32" if cpu else "float16")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)

    meta = {"torch": torch.__version__, "args": vars(args), "python": platform.python_version()}
    rows = []
    if cpu:
        device_name = bench_device_name("cpu")
        meta["threads"] = torch.get_num_threads()
        for H in args.hidden_sizes:
            for V in args.vocab_sizes:
                rows.append(bench_cpu_row(args.tokens, H, V, args.num_basis, args.clusters, dtype))
    else:
        import triton

        device_name = bench_device_name("cuda")
        meta["triton"] = triton.__version__
        copy_bw = copy_bandwidth("cuda", _do_bench)
        meta["copy_bandwidth_GBps"] = copy_bw / 1e9
        print(f"copy bandwidth (read+write): {copy_bw / 1e12:.2f} TB/s")
        for H in args.hidden_sizes:
            for V in args.vocab_sizes:
                rows.append(
                    bench_cuda_row(args.tokens, H, V, args.num_basis, args.clusters, dtype, "cuda",
                                   args.cuda_graphs, copy_bw)
                )
                print(json.dumps(rows[-1]), flush=True)
    meta["device"] = device_name
    _print_table(rows, device_name, not cpu and args.cuda_graphs)
    out = Path(args.out) if args.out else result_path("basis_vs_linear", "cpu" if cpu else "cuda")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return rows


if __name__ == "__main__":
    main()
