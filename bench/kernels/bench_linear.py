"""Linear-layer microbenchmark: pyserve's `Linear` (weight pre-laid-out) against `F.linear`.

The shapes are the default model's (SmolLM2-135M: hidden 576, q/k/v 960,
gate/up 2 x 1536, vocab 49152) at a decode batch (`--batch`, default 32) and a
prefill chunk of 512 tokens, plus batch 1. Both sides run in one process on
the same random fp32 weights, interleaved. Prints median microseconds per call,
GFLOP/s and the ratio, as a table and one JSON line.

    python bench/kernels/bench_linear.py [--batch 32] [--dtype bfloat16] [--threads N]

`--buckets` measures instead what running only a fixed set of row counts costs (models/linear.py pads a
call up to the next bucket and runs more than 256 rows in 256-row chunks, so that oneDNN never builds and
caches a primitive per batch size): pyserve's `Linear` against one oneDNN call at the exact row count, on
the same pre-laid-out weight, at row counts between buckets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

from pyserve.models.linear import Linear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import timed_side_by_side  # noqa: E402

# (name, in_features, out_features) of the default model's matmuls.
LAYERS = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576),
          ("lm_head", 576, 49152)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--buckets", action="store_true", help="the cost of row-count buckets (see above)")
    a = p.parse_args()
    if a.buckets:
        return bucket_cost(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for m in sorted({1, a.batch, 512}):
            for name, k, n in LAYERS:
                w = torch.randn(n, k, generator=gen).to(dtype).to(a.device)
                x = torch.randn(m, k, generator=gen).to(dtype).to(a.device)
                ours = Linear(w)
                times = timed_side_by_side({"ours": lambda: ours(x), "torch": lambda: F.linear(x, w)},
                                           a.iters, a.warmup, a.device)
                (t_ours, _), (t_torch, _) = times["ours"], times["torch"]
                flops = 2 * m * k * n
                rows.append({"layer": name, "m": m, "k": k, "n": n, "pyserve_us": t_ours * 1e6,
                             "torch_us": t_torch * 1e6, "pyserve_gflops": flops / t_ours / 1e9,
                             "torch_gflops": flops / t_torch / 1e9, "ratio": t_torch / t_ours,
                             "prepacked": ours.packed})
    print(f"linear: {a.dtype} on {a.device} ({torch.get_num_threads()} threads); pyserve Linear vs F.linear")
    print(f"{'layer':8s} {'M x K x N':>18s} {'pyserve us':>11s} {'F.linear us':>12s} {'pyserve GF/s':>13s} "
          f"{'F.linear GF/s':>14s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['layer']:8s} {r['m']:>6d}x{r['k']:>4d}x{r['n']:<6d} {r['pyserve_us']:11.1f} {r['torch_us']:12.1f} "
              f"{r['pyserve_gflops']:13.1f} {r['torch_gflops']:14.1f} {r['ratio']:6.2f}x")
    print(json.dumps({"bench": "linear", "device": a.device, "dtype": a.dtype, "machine": platform.machine(),
                      "threads": torch.get_num_threads(), "rows": rows}))


def bucket_cost(a) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for name, k, n in LAYERS[:4]:
            ours = Linear(torch.randn(n, k, generator=gen).to(dtype))
            if not ours.packed:
                raise SystemExit("bench_linear --buckets: this torch has no oneDNN")
            for m in (17, 33, 45, 129, 300, 1000, 2048):
                x = torch.randn(m, k, generator=gen).to(dtype)
                times = timed_side_by_side({"bucketed": lambda: ours(x), "exact": lambda: ours._run(x)},
                                           a.iters, a.warmup, "cpu")
                (t_b, _), (t_e, _) = times["bucketed"], times["exact"]
                rows.append({"layer": name, "m": m, "k": k, "n": n, "bucketed_us": t_b * 1e6, "exact_us": t_e * 1e6,
                             "exact_over_bucketed": t_e / t_b})
    print(f"linear buckets: {a.dtype} ({torch.get_num_threads()} threads); bucketed Linear vs one exact-M call")
    print(f"{'layer':8s} {'M x K x N':>18s} {'bucketed us':>12s} {'exact us':>10s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['layer']:8s} {r['m']:>6d}x{r['k']:>4d}x{r['n']:<6d} {r['bucketed_us']:12.1f} {r['exact_us']:10.1f} "
              f"{r['exact_over_bucketed']:6.2f}x")
    print(json.dumps({"bench": "linear_buckets", "dtype": a.dtype, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
