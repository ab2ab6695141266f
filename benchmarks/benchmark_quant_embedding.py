"""QuantEmbedding lookup bandwidth against the device's copy bandwidth.

For each nbit, times `QuantEmbedding(ids)` for T tokens of a V x D table (fp16 output by default) and reports

    achieved bandwidth = (T * ceil(D * nbit / 8) packed bytes read + T * D * 2 output bytes written) / time

and its fraction of the copy bandwidth measured in the same run (torch copy of a ~1 GiB tensor, bytes read +
written / time; the target is >= 50%). A dense nn.Embedding row gives the uncompressed reference point.
Every lookup is first checked against the PyTorch reference.

    python benchmarks/benchmark_quant_embedding.py                       # CUDA: Triton kernel, do_bench medians
    python benchmarks/benchmark_quant_embedding.py --device cpu --vocab 2000 --dim 256 --tokens 512   # smoke test

Writes benchmarks/results/quant_embedding_<device-slug>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_utils import copy_bandwidth, device_name, result_path

from hf_basis.modules.quant_embedding import QuantEmbedding
from hf_basis.ops.dispatch import use_triton
from hf_basis.ops.quant_lookup import quant_lookup_reference

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def bench_ms(fn, device: torch.device) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, a perf_counter loop elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--nbits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the copy-bandwidth tensor")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/quant_embedding_<slug>)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    name = device_name(device)
    torch.manual_seed(0)

    copy_bw = copy_bandwidth(device, lambda fn: bench_ms(fn, device), args.copy_mib)
    # Heavy-tailed rows, like trained embeddings, so the clip search has work to do.
    weight = torch.distributions.StudentT(4.0).sample((args.vocab, args.dim)).to(device) * 0.02
    ids = torch.randint(0, args.vocab, (args.tokens,), device=device)
    out_bytes = args.tokens * args.dim * dtype.itemsize

    rows = []
    dense = torch.nn.Embedding(args.vocab, args.dim, _weight=weight.to(dtype), device=device)
    with torch.no_grad():
        ms = bench_ms(lambda: dense(ids), device)
    read = args.tokens * args.dim * dtype.itemsize
    rows.append({"layer": f"nn.Embedding {args.dtype}", "nbit": None, "ms": ms, "bytes": read + out_bytes})

    for nbit in args.nbits:
        emb = QuantEmbedding(args.vocab, args.dim, _weight=weight, nbit=nbit, dtype=dtype)
        table = emb.table
        check = ids[:1024]
        expected = quant_lookup_reference(table.packed, table.levels, check, nbit, args.dim, dtype)
        if not torch.equal(emb(check), expected):
            raise AssertionError(f"nbit={nbit}: the lookup differs from the PyTorch reference")
        ms = bench_ms(lambda: emb(ids), device)
        read = args.tokens * table.packed.shape[1]
        rows.append({
            "layer": f"QuantEmbedding {nbit}-bit", "nbit": nbit, "ms": ms, "bytes": read + out_bytes,
            "relative_error": table.relative_error, "clip": table.clip,
        })  # fmt: skip
        del emb, table

    for row in rows:
        row["bandwidth_GBps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
        row["fraction_of_copy"] = row["bandwidth_GBps"] * 1e9 / copy_bw

    path = "triton" if use_triton(ids) else "reference"
    print(f"device: {name} ({device}), torch {torch.__version__}, quant path: {path}")
    print(f"T={args.tokens} tokens, V={args.vocab}, D={args.dim}, output {args.dtype}")
    print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write, {args.copy_mib} MiB)")
    print(f"{'layer':<24}{'ms':>10}{'MB moved':>11}{'GB/s':>9}{'of copy':>9}{'rel. err':>10}")
    for row in rows:
        err = f"{row['relative_error']:.4f}" if row.get("relative_error") is not None else "-"
        print(
            f"{row['layer']:<24}{row['ms']:>10.4f}{row['bytes'] / 1e6:>11.1f}{row['bandwidth_GBps']:>9.0f}"
            f"{row['fraction_of_copy']:>9.1%}{err:>10}"
        )

    result = {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "quant_path": path,
        "tokens": args.tokens,
        "vocab": args.vocab,
        "dim": args.dim,
        "dtype": args.dtype,
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "rows": rows,
    }
    if device.type == "cuda":
        import triton

        result["triton"] = triton.__version__
    out = args.out or result_path("quant_embedding", device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
