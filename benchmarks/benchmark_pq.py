"""Time `product_quantize` (batched k-means product quantization) on a random matrix.

Not a test. Default: a 50,000 x 768 float32 randn matrix (the size of a small LM's embedding table), num_basis=8,
num_clusters=256, on the CPU with torch's default thread count. Prints a table and writes JSON.

    python benchmarks/benchmark_pq.py                                   # -> benchmarks/results/pq_cpu.json
    python benchmarks/benchmark_pq.py --device cuda --out benchmarks/results/pq_cuda.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_utils import device_name, result_path

from hf_basis.compress.pq import product_quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000, help="V, rows of the matrix")
    parser.add_argument("--dim", type=int, default=768, help="D, columns of the matrix")
    parser.add_argument("--num-basis", type=int, default=8, help="sub-spaces B (must divide --dim)")
    parser.add_argument("--clusters", type=int, default=256, help="centroids K per sub-space")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--max-iter", type=int, default=None, help="Lloyd iterations cap (default: the function's)")
    parser.add_argument("--tol", type=float, default=None, help="relative objective decrease to stop at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pq_<device type>.json)")
    args = parser.parse_args()

    device = torch.device(args.device)
    out = Path(args.out) if args.out else result_path("pq", device)
    generator = torch.Generator(device=device).manual_seed(1234)
    weight = torch.randn(args.rows, args.dim, generator=generator, device=device)
    kwargs = {"seed": args.seed}
    if args.max_iter is not None:
        kwargs["max_iter"] = args.max_iter
    if args.tol is not None:
        kwargs["tol"] = args.tol

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = product_quantize(weight, args.num_basis, args.clusters, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    record = {
        "device": device_name(device),
        "shape": [args.rows, args.dim],
        "num_basis": args.num_basis,
        "num_clusters": args.clusters,
        "max_iter": kwargs.get("max_iter", "default"),
        "tol": kwargs.get("tol", "default"),
        "iterations": result.iterations,
        "seconds": round(seconds, 3),
        "relative_error": result.relative_error,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    rows = [
        ("device", record["device"]),
        ("shape", f"{args.rows} x {args.dim}"),
        ("B x K", f"{args.num_basis} x {args.clusters}"),
        ("iterations", str(result.iterations)),
        ("seconds", f"{seconds:.2f}"),
        ("relative error", f"{result.relative_error:.5f}"),
        ("torch", f"{torch.__version__} ({torch.get_num_threads()} threads)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
