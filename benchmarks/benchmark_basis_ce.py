"""Fused basis cross-entropy vs dense peers: time (fwd+bwd of the mean loss) and peak extra memory, one run.

Methods (bf16, no bias, random data; labels uniform over the vocabulary):
  basis   hf_basis.ops.basis_cross_entropy over an 8 x 384 basis head (Triton kernels, default configs)
  basis_gtN  the same with an N MiB budget for the V x Tc gradient buffer (another token chunk size)
  basis_1thread  the same eager call with autograd's backward on the calling thread
           (`torch.autograd.set_multithreading_enabled(False)`): on the benchmark host, handing the backward to
           autograd's CUDA worker thread costs ~0.4 ms per call (a trivial custom Function's fwd+bwd: 369 us)
  basis_graph  the basis call captured once in a CUDA graph and replayed: its GPU time alone, without the host's
           Python / Triton launch overhead (which sets the pace of small calls on a slow host CPU); no memory column.
           Under capture the op keeps its two-pass path (the one-pass path's overflow check syncs with the host)
  dense   PyTorch: F.linear, upcast to fp32, F.cross_entropy (what transformers' ForCausalLMLoss does)
  liger   Liger-Kernel LigerFusedLinearCrossEntropyLoss (liger-kernel 0.8.5)
  cce     Apple Cut Cross-Entropy linear_cross_entropy (cut-cross-entropy 25.1.1, default impl "cce")
A peer that cannot be imported or fails is reported as such. Time: triton.testing.do_bench median. Memory: peak of
torch.cuda.max_memory_allocated during one call above what was allocated before it (gradients included).
The basis result is also checked against dense CE on the decoded weight (relative error of loss and grad_hidden).

    PYTHONPATH=. python benchmarks/benchmark_basis_ce.py              # table + benchmarks/results/basis_ce_<gpu>.json
    PYTHONPATH=. python benchmarks/benchmark_basis_ce.py --breakdown     # per-kernel times and block-size variants
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_utils import capture_graph, result_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_basis.ops.basis_cross_entropy import basis_cross_entropy  # noqa: E402
from hf_basis.ops.basis_linear import centroid_scores  # noqa: E402

SHAPES = [(8192, 4096, 128256), (2048, 2048, 50000)]
# measured_anchors.md (H100, same definitions): ms / GiB
ANCHORS = {
    (8192, 4096, 128256): {"dense": (53.3, 12.0), "liger": (67.2, 1.13), "cce": (158.0, 1.07)},
    (2048, 2048, 50000): {"dense": (3.36, 1.17), "liger": (12.2, 0.22), "cce": (8.4, 0.20)},
}
GiB = 2**30
# (basis method, key of its speedups in the JSON summary, its label in the table's speedup column)
SPEEDUP_VARIANTS = [
    ("basis", "speedup_vs", ""),
    ("basis_1thread", "one_thread_speedup_vs", "autograd on the calling thread"),
    ("basis_graph", "gpu_only_speedup_vs", "GPU only"),
]


def make_problem(T, H, V, B, K, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    hidden = (torch.randn(T, H, device=dev, generator=g) * 1.0).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), device=dev, generator=g)
    centroids = (torch.randn(B, K, H // B, device=dev, generator=g) * (1.0 / H) ** 0.5).to(dtype).requires_grad_()
    codes = torch.randint(0, K, (V, B), device=dev, generator=g).to(torch.int16 if K > 256 else torch.uint8)
    return hidden, labels, centroids, codes


def decoded_weight(centroids, codes):
    B, K, d = centroids.shape
    rows = [centroids[b][codes[:, b].long()] for b in range(B)]  # (V, d) each
    return torch.cat(rows, dim=1).detach()  # (V, H)


def method_fn(name, hidden, labels, centroids, codes, weight):
    """(callable computing fwd+bwd, tensors whose .grad to reset) or raises."""
    if name == "basis":
        def fn():
            basis_cross_entropy(hidden, centroids, codes, None, labels).backward()
        return fn, [hidden, centroids]
    if name == "basis_1thread":
        def fn():
            with torch.autograd.set_multithreading_enabled(False):
                basis_cross_entropy(hidden, centroids, codes, None, labels).backward()
        return fn, [hidden, centroids]
    if name.startswith("basis_gt"):  # the same with another Gt budget (MiB), i.e. another token chunk size
        from hf_basis.ops.basis_cross_entropy_triton import chunk_tokens

        tc = chunk_tokens(hidden.shape[0], codes.shape[0], hidden.element_size(), int(name[8:]) * 2**20)

        def fn():
            basis_cross_entropy(hidden, centroids, codes, None, labels, chunk_tokens=tc).backward()
        return fn, [hidden, centroids]
    if name == "basis_graph":
        graph = capture_graph(lambda: basis_cross_entropy(hidden, centroids, codes, None, labels).backward(),
                              [hidden, centroids])
        return graph.replay, []
    if name == "dense":
        def fn():
            F.cross_entropy(F.linear(hidden, weight).float(), labels).backward()
        return fn, [hidden, weight]
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss()

        def fn():
            loss_fn(weight, hidden, labels).backward()
        return fn, [hidden, weight]
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def fn():
            linear_cross_entropy(hidden, weight, labels).backward()
        return fn, [hidden, weight]
    raise ValueError(name)


def measure(fn, grads, rep_ms):
    import triton

    for t in grads:
        t.grad = None
    fn()  # warm-up: compilation, autotuning, the codes' CSR
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / GiB
    ms = triton.testing.do_bench(fn, warmup=max(50, rep_ms // 4), rep=rep_ms, grad_to_none=grads,
                                 return_mode="median")
    for t in grads:
        t.grad = None
    return ms, peak


def check_basis(hidden, labels, centroids, codes, weight):
    """Relative error of our loss and grad_hidden vs dense CE on the decoded weight (fp32 logits)."""
    hidden.grad = None
    loss = basis_cross_entropy(hidden, centroids, codes, None, labels)
    loss.backward()
    g = hidden.grad.float()
    hidden.grad = None
    h2 = hidden.detach().requires_grad_()
    ref = F.cross_entropy(F.linear(h2, weight.detach()).float(), labels)
    ref.backward()
    g_ref = h2.grad.float()
    err = ((loss - ref).abs() / ref.abs()).item(), ((g - g_ref).norm() / g_ref.norm()).item()
    del h2, g, g_ref, ref
    return err


def run_table(args):
    import triton

    name = torch.cuda.get_device_name()
    results = []
    for T, H, V in args.shapes:
        hidden, labels, centroids, codes = make_problem(T, H, V, args.num_basis, args.clusters, torch.bfloat16)
        weight = decoded_weight(centroids, codes).requires_grad_()
        row = {"T": T, "H": H, "V": V, "dtype": "bfloat16", "num_basis": args.num_basis, "clusters": args.clusters}
        try:
            row["check_loss_rel_err"], row["check_grad_hidden_rel_err"] = check_basis(hidden, labels, centroids,
                                                                                      codes, weight)
        except Exception as e:  # noqa: BLE001
            row["check_error"] = f"{type(e).__name__}: {e}"[:300]
        for method in args.methods:
            entry = dict(row, method=method)
            try:
                fn, grads = method_fn(method, hidden, labels, centroids, codes, weight)
                entry["ms"], entry["peak_gib"] = measure(fn, grads, args.rep_ms)
                if method == "basis_graph":
                    entry["peak_gib"] = None  # replay allocates nothing: the memory of the eager call is "basis"
                del fn
            except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                entry["error"] = f"{type(e).__name__}: {e}"[:300]
            results.append(entry)
            gc.collect()
            torch.cuda.empty_cache()
            print(json.dumps(entry), flush=True)
        del hidden, labels, centroids, codes, weight
        gc.collect()
        torch.cuda.empty_cache()

    # Table + targets
    lines = [f"device: {name}   (fwd+bwd of the mean loss, bf16; ms = do_bench median; GiB = peak extra memory)",
             f"{'T, H, V':>22} | " + " | ".join(f"{m:>18}" for m in args.methods) + " | basis speedup vs"]
    summary = []
    for T, H, V in args.shapes:
        cells, by = [], {}
        for m in args.methods:
            e = next(r for r in results if (r["T"], r["H"], r["V"], r["method"]) == (T, H, V, m))
            by[m] = e
            mem = f"{e['peak_gib']:5.2f}G" if e.get("peak_gib") is not None else f"{'':>6}"
            cells.append(f"{e['ms']:8.2f} ms {mem}" if "ms" in e else f"{'failed':>18}")
        peers = {m: e["ms"] for m, e in by.items() if not m.startswith("basis") and "ms" in e}
        entry = {"shape": [T, H, V]}
        sp = "-" if "ms" not in by.get("basis", {}) else ""
        for method, key, label in SPEEDUP_VARIANTS:
            ms = by.get(method, {}).get("ms")
            entry[key] = {m: v / ms for m, v in peers.items()} if ms else {}
            if ms:
                ratios = " ".join(f"{m} {v:.1f}x" for m, v in entry[key].items())
                sp += f" ({label}: {ratios})" if label else ratios
        lines.append(f"{f'{T}, {H}, {V}':>22} | " + " | ".join(cells) + f" | {sp}")
        summary.append(entry)
    for r in results:
        if "error" in r:
            lines.append(f"  {r['method']} at {r['T']},{r['H']},{r['V']}: {r['error']}")
    check = [r for r in results if r["method"] == "basis"]
    for r in check:
        lines.append(f"  check basis vs dense CE on decoded W at {r['T']},{r['H']},{r['V']}: loss rel err "
                     f"{r.get('check_loss_rel_err', float('nan')):.2e}, grad_hidden rel err "
                     f"{r.get('check_grad_hidden_rel_err', float('nan')):.2e} {r.get('check_error', '')}")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out) if args.out else result_path("basis_ce", "cuda")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
        "definition": "fwd+bwd of the mean loss; ms = triton.testing.do_bench median; peak_gib = "
                      "max_memory_allocated during one call minus memory_allocated before it",
        "anchors_ms_gib": {f"{k[0]},{k[1]},{k[2]}": v for k, v in ANCHORS.items()},
        "results": results, "speedups": summary, "table": table, "ce_config_override": args.tuned,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------------------------------------
# --breakdown: per-kernel times and block-size variants, with the byte/gather arithmetic next to them
# ---------------------------------------------------------------------------------------------------------------------


def apply_ce_config(cfg: dict) -> None:
    """Override the Triton launchers' default configs in this process (what --tune found; see tuned JSON)."""
    from hf_basis.ops import basis_cross_entropy_triton as K

    if "lse" in cfg:
        lse = dict(cfg["lse"])
        per_sm = lse.pop("programs_per_sm")
        K._lse_config = lambda T, V, p_bytes, device: dict(lse, splits=K._splits(triton_cdiv(T, lse["BLOCK_T"]), V,
                                                                       lse["BLOCK_V"], per_sm, device))
    if "grad" in cfg:
        K._grad_config = lambda Tc, V: dict(cfg["grad"])
    if "segment" in cfg:
        K._segment_config = lambda Tc: dict(cfg["segment"], BLOCK_T=min(cfg["segment"]["BLOCK_T"], Tc))
    if "gt_bytes" in cfg:
        K._GT_BYTES = cfg["gt_bytes"]
        K.chunk_tokens.__defaults__ = (cfg["gt_bytes"],)


def triton_cdiv(a, b):
    return -(-a // b)


def run_breakdown(args):
    """Per-kernel times for block-size variants. Returns the rows (and, with --tune, the best config per stage)."""
    import triton

    from hf_basis.ops import basis_cross_entropy_triton as K
    from hf_basis.ops.basis_decode_triton import _segment_sum_kernel, codes_csr

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=args.rep_ms // 2, return_mode="median")

    rows = []
    for T, H, V in args.shapes:
        B, Kc = args.num_basis, args.clusters
        hidden, labels, centroids, codes = make_problem(T, H, V, B, Kc, torch.bfloat16)
        hidden = hidden.detach()
        centroids = centroids.detach()
        P = centroid_scores(hidden, centroids).contiguous()
        stats, _ = K.forward_stats_triton(P, codes, None, labels)
        scale = torch.full((1,), 1.0 / T, device="cuda")
        words, seg = codes_csr(codes, Kc)
        logits = T * V
        tag = f"{T},{H},{V}"

        def rec(stage, cfg, ms, note=""):
            r = {"shape": tag, "stage": stage, "config": cfg, "ms": ms, "note": note}
            rows.append(r)
            print(json.dumps(r), flush=True)

        # CPU cost of one launch (tiny problem: the GPU work is a few microseconds)
        tP, tcodes = P[:, :, :16].contiguous(), codes[:256].contiguous()
        tstats, tGt, tgP = stats[:, :16].contiguous(), torch.zeros(256, 16, device="cuda", dtype=P.dtype), \
            torch.empty(B, Kc, 16, device="cuda", dtype=P.dtype)
        tw, ts = codes_csr(tcodes, Kc)

        def launches_grad():
            for _ in range(50):
                K._ce_grad_kernel[(2,)](tP, tcodes, tP, tstats, labels, scale, tGt, tstats, 256, 16, 0, 16, 16,
                                        Kc * 16, 0, 1.0, NUM_BASIS=B, HAS_BIAS=False, HAS_SOFTCAP=False,
                                        NEED_BIAS_GRAD=False, BLOCK_T=16, BLOCK_V=128, num_warps=4, num_stages=1)

        def launches_seg():
            for _ in range(50):
                _segment_sum_kernel[(8, 1)](tGt, tw, ts, tgP, 16, 16, BLOCK_W=32, BLOCK_T=16)

        def launches_torch():
            for _ in range(50):
                torch.add(tstats, 1.0)
        for nm, fn in (("grad kernel", launches_grad), ("segment kernel", launches_seg), ("torch.add", launches_torch)):
            rec(f"launch cost: {nm}", {}, bench(fn) / 50 * 1e3, "us per launch (50 back to back)")

        rec("centroid_scores bmm", {}, bench(lambda: centroid_scores(hidden, centroids)),
            f"{2 * T * Kc * H / 1e9:.1f} GFLOP")
        for bt, bv, nw, per_sm, *stages in args.lse_variants:
            cfg = {"BLOCK_T": bt, "BLOCK_V": bv, "num_warps": nw, "num_stages": stages[0] if stages else 1,
                   "splits": K._splits(triton.cdiv(T, bt), V, bv, per_sm, P.device)}
            try:
                ms = bench(lambda: K.lse_partials_triton(P, codes, None, config=dict(cfg)))
                rec("lse", dict(cfg, programs_per_sm=per_sm), ms, f"{logits / ms / 1e6:.0f} logits/ns")
            except Exception as e:  # noqa: BLE001
                rec("lse", cfg, float("nan"), f"failed: {type(e).__name__}: {e}"[:200])
        rec("forward_stats_triton (defaults)", {}, bench(lambda: K.forward_stats_triton(P, codes, None, labels)))
        for tc in args.chunks:
            Gt = torch.zeros((V, tc), device="cuda", dtype=P.dtype)
            n_chunks = triton.cdiv(T, tc)
            for bt, bv, nw, *stages in args.grad_variants:
                gcfg = {"BLOCK_T": bt, "BLOCK_V": bv, "num_warps": nw, "num_stages": stages[0] if stages else 1}

                def grad_only():
                    for i in range(n_chunks):
                        t0 = i * tc
                        K._ce_grad_kernel[(triton.cdiv(V, bv),)](
                            P, codes, P, stats, labels, scale, Gt, stats, V, T, t0, min(tc, T - t0), tc, Kc * T, 0,
                            1.0, NUM_BASIS=B, HAS_BIAS=False, HAS_SOFTCAP=False, NEED_BIAS_GRAD=False, **gcfg)
                try:
                    ms = bench(grad_only)
                    rec("grad kernel", dict(gcfg, chunk=tc), ms, f"{logits / ms / 1e6:.0f} logits/ns")
                except Exception as e:  # noqa: BLE001
                    rec("grad kernel", dict(gcfg, chunk=tc), float("nan"), f"failed: {e}"[:200])
            gP = torch.empty((B, Kc, tc), device="cuda", dtype=P.dtype)
            for bw, bt, nw, ns in args.segment_variants:
                scfg = {"BLOCK_W": bw, "BLOCK_T": min(bt, tc), "num_warps": nw, "num_stages": ns}

                def seg_only():
                    for _ in range(n_chunks):
                        _segment_sum_kernel[(B * Kc, triton.cdiv(tc, scfg["BLOCK_T"]))](Gt, words, seg, gP, tc, tc,
                                                                                         **scfg)
                try:
                    ms = bench(seg_only)
                    rec("segment sum", dict(scfg, chunk=tc), ms,
                        f"reads {B * logits * 2 / ms / 1e9:.2f} TB/s of Gt (x{B})")
                except Exception as e:  # noqa: BLE001
                    rec("segment sum", dict(scfg, chunk=tc), float("nan"), f"failed: {e}"[:200])
            rec("ce_grad_triton (default configs)", {"chunk": tc},
                bench(lambda: K.ce_grad_triton(P, codes, None, stats, labels, scale, need_bias_grad=False, chunk=tc)))
            del Gt, gP
        gPf = torch.randn_like(P)
        rec("backward bmms", {}, bench(lambda: (torch.bmm(gPf.transpose(1, 2), centroids).permute(1, 0, 2)
                                                .reshape(T, H), torch.bmm(gPf, hidden.view(T, B, -1)
                                                                          .permute(1, 0, 2)))))
        hidden.requires_grad_()
        centroids.requires_grad_()
        for mb in args.budgets_mb:
            tc = K.chunk_tokens(T, V, 2, mb * 2**20)
            rec("full fwd+bwd (default kernels)", {"gt_mb": mb, "chunk": tc}, triton.testing.do_bench(
                lambda: basis_cross_entropy(hidden, centroids, codes, None, labels, chunk_tokens=tc).backward(),
                warmup=25, rep=args.rep_ms, grad_to_none=[hidden, centroids], return_mode="median"))
        del hidden, labels, centroids, codes, P
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n{'shape':>18} | {'stage':<34} | {'ms':>8} | config / note")
    for r in rows:
        print(f"{r['shape']:>18} | {r['stage']:<34} | {r['ms']:8.3f} | {r['config']} {r['note']}")
    return rows


def pick_best(rows, shapes):
    """Per stage, the config with the smallest sum over shapes of time / best time at that shape."""
    tags = [f"{T},{H},{V}" for T, H, V in shapes]
    best = {}
    for stage, key in (("lse", "lse"), ("grad kernel", "grad"), ("segment sum", "segment")):
        scores = {}
        for r in rows:
            if r["stage"] != stage or r["ms"] != r["ms"]:
                continue
            cfg = {k: v for k, v in r["config"].items() if k not in ("chunk", "splits")}
            scores.setdefault(json.dumps(cfg, sort_keys=True), {}).setdefault(r["shape"], []).append(r["ms"])
        mins = {t: min(min(v[t]) for v in scores.values() if t in v) for t in tags}
        total = {c: sum(min(v[t]) / mins[t] for t in tags) for c, v in scores.items() if all(t in v for t in tags)}
        if total:
            best[key] = json.loads(min(total, key=total.get))
    return best


def _tuples(text):
    return [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES), help="T,H,V;T,H,V")
    p.add_argument("--methods", default="basis,basis_1thread,basis_graph,dense,liger,cce")
    p.add_argument("--num-basis", type=int, default=8)
    p.add_argument("--clusters", type=int, default=384)
    p.add_argument("--rep-ms", type=int, default=400)
    p.add_argument("--out", default=None)
    p.add_argument("--breakdown", action="store_true", help="per-kernel times of block-size variants")
    p.add_argument("--tune", default=None, help="breakdown, then write the best configs to this JSON and run the "
                                                "table with them")
    p.add_argument("--ce-config", default=None, help="JSON of launcher configs to use (what --tune wrote)")
    # lse: BLOCK_T,BLOCK_V,num_warps,programs_per_sm[,num_stages]
    p.add_argument("--lse-variants", default="32,128,4,4;64,64,4,4;64,128,8,4;64,32,2,8;32,256,8,2;128,32,4,4;"
                                             "32,64,4,8")
    # grad: BLOCK_T,BLOCK_V,num_warps[,num_stages]
    p.add_argument("--grad-variants", default="32,128,4;64,64,4;64,128,8;64,32,2;32,64,2;128,32,4;32,256,8")
    p.add_argument("--chunks", default="128,256,512", help="token chunks for the per-kernel rows")
    p.add_argument("--budgets-mb", default="32,64,128,256", help="Gt budgets (MiB) for the full fwd+bwd rows")
    # segment: BLOCK_W,BLOCK_T,num_warps,num_stages
    p.add_argument("--segment-variants", default="16,64,4,2;32,64,4,2;32,128,4,2")
    args = p.parse_args()
    args.shapes = _tuples(args.shapes)
    args.methods = args.methods.split(",")
    args.lse_variants = _tuples(args.lse_variants)
    args.grad_variants = _tuples(args.grad_variants)
    args.segment_variants = _tuples(args.segment_variants)
    args.chunks = [int(c) for c in args.chunks.split(",")]
    args.budgets_mb = [int(c) for c in args.budgets_mb.split(",")]
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if args.breakdown:
        rows = run_breakdown(args)
        if args.out:
            Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))
        return
    tuned = None
    if args.tune:
        rows = run_breakdown(args)
        tuned = pick_best(rows, args.shapes)
        full = {}  # Gt budget (MiB) with the fastest full fwd+bwd, summed over shapes relative to each best
        for T, H, V in args.shapes:
            cand = [r for r in rows if r["shape"] == f"{T},{H},{V}" and r["stage"].startswith("full")]
            for r in cand:
                full.setdefault(r["config"]["gt_mb"], []).append(r["ms"] / min(c["ms"] for c in cand))
        if full:
            tuned["gt_bytes"] = int(min(full, key=lambda k: sum(full[k]))) * 2**20
        Path(args.tune).write_text(json.dumps({"tuned": tuned, "rows": rows}, indent=2))
        print("tuned:", json.dumps(tuned))
    elif args.ce_config:
        tuned = json.loads(Path(args.ce_config).read_text())["tuned"]
    if tuned:
        apply_ce_config(tuned)
    args.tuned = tuned
    run_table(args)


if __name__ == "__main__":
    main()
