"""Quantized matmul microbenchmark (issue 16): `quant_linear` on GGUF block formats against the fp32
oneDNN matmul the model runs today (`pyserve.models.linear.Linear`).

Shapes are the default model's (SmolLM2-135M: hidden 576, fused q/k/v 960, gate/up 2 x 1536, down
1536 -> 576, vocab 49152), a 2048 -> 8192 weight (16-30 MB quantized: it still fits a 32 MB L3 when the
loop repeats it) and Llama-3-8B's 4096 -> 14336 (33-62 MB: past that L3, so m = 1 reads DRAM), at
m = 1, 8, 32 and 256 rows. Both sides run in one process on the same random weights (the fp32 side gets the dequantized
quantized weight), interleaved (bench/kernels/timing.py). At m = 1 a matmul streams its weight once, so
the table also gives the weight bytes read per second and their share of the machine's copy bandwidth
(a large torch copy, bytes read + written per second), best sample against best sample (the min is the
robust figure on a shared machine, timing.py). Prints median microseconds, a table and one JSON line.

    python bench/kernels/bench_quant_linear.py [--formats Q4_1,Q8_0] [--rows 1,8,32,256] [--threads N]
                                               [--threads 1 --thread-time]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

import pyserve
from pyserve import _ops
from pyserve.models.linear import Linear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_baseline  # noqa: E402
from timing import cpu_copy_bandwidth, timed_side_by_side  # noqa: E402

# (name, in_features, out_features)
LAYERS = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576),
          ("lm_head", 576, 49152), ("big", 2048, 8192),
          # Llama-3-8B's MLP: 33-62 MB quantized, past a 32 MB L3, so m = 1 streams it from DRAM every call
          ("beyond_l3", 4096, 14336)]
FORMATS = {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
# K-quants: GGUF bytes per super-block of 256 and the offset of their fp16 scale(s).
K_BLOCKS = {12: (144, (0, 2)), 13: (176, (0, 2)), 14: (210, (208,))}


def blocks_of(w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """w's GGUF blocks: quantize_rows where we have ggml's quantizer, else random valid blocks of w's size
    (a K-quant's speed does not depend on its values)."""
    if ggml_type not in K_BLOCKS:
        return _ops.quantize_rows(w, ggml_type)
    n, k = w.shape
    nbytes, scale_offsets = K_BLOCKS[ggml_type]
    blocks = torch.randint(0, 256, (n, k // 256, nbytes), dtype=torch.uint8)
    for off in scale_offsets:
        blocks[..., off:off + 2] = torch.full((n, k // 256, 1), 1e-4, dtype=torch.float16).view(torch.uint8)
    return blocks.reshape(n, -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", default="Q8_0,Q4_0,Q4_1,Q6_K", help=f"of {', '.join(FORMATS)}")
    p.add_argument("--rows", default="1,8,32,256")
    p.add_argument("--layers", default=",".join(name for name, _, _ in LAYERS))
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline", default=None,
                   help="library from build_baseline.py: its quant_linear is timed side by side as '<format> base' "
                        "(weights packed by its own quant_pack)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--thread-time", action="store_true",
                   help="with --threads 1: time the calling thread's CPU time, not wall time (a busy machine)")
    a = p.parse_args()
    if a.thread_time and a.threads != 1:
        raise SystemExit("bench_quant_linear: --thread-time needs --threads 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    formats = a.formats.split(",")
    base_ops = build_baseline.load(a.baseline) if a.baseline else None
    if base_ops is not None:
        formats = [g for f in formats for g in (f, f + " base")]
    rows_list = [int(m) for m in a.rows.split(",")]
    layers = [layer for layer in LAYERS if layer[0] in a.layers.split(",")]
    copy_bw = cpu_copy_bandwidth()
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for name, k, n in layers:
            w = torch.randn(n, k, generator=gen) * 0.05
            quant = {}
            for f in formats:
                t = FORMATS[f.removesuffix(" base")]
                if k % _ops.QUANT_FORMATS[t][0]:
                    continue  # a K-quant needs in_features % 256 == 0 (not the default model's 576)
                ops = base_ops if f.endswith(" base") else torch.ops.pyserve
                packed = ops.quant_pack(blocks_of(w, t), t, k)
                quant[f] = (t, packed, ops)
            first = next(iter(quant.values()))
            dense = Linear(_ops.quant_dequant_rows(first[1], torch.arange(n), first[0], n, k))  # first: not a base
            for m in rows_list:
                x = torch.randn(m, k, generator=gen)
                fns = {"fp32": lambda: dense(x)}
                for f, (t, packed, ops) in quant.items():
                    fns[f] = lambda t=t, packed=packed, ops=ops: ops.quant_linear(x, packed, t, n, k, None)
                iters = a.iters if n * k * max(m, 8) < (1 << 28) else max(5, a.iters // 3)
                # With a baseline: a random order each round, so that neither copy always follows the fp32 call
                # (whose 4x larger weight leaves the caches cold).
                times = timed_side_by_side(fns, iters, a.warmup, "cpu", thread_time=a.thread_time,
                                           shuffle=base_ops is not None)
                t_dense = times["fp32"][0]
                row = {"layer": name, "m": m, "k": k, "n": n, "fp32_us": t_dense * 1e6}  # medians
                for f, (t, packed, _) in quant.items():
                    med, best = times[f]
                    row[f] = {"us": med * 1e6, "min_us": best * 1e6, "speedup_vs_fp32": t_dense / med,
                              "weight_bytes": packed.numel(), "gb_s": packed.numel() / med / 1e9,
                              "gb_s_best": packed.numel() / best / 1e9}
                rows.append(row)
    info = pyserve.build_info()
    clock = "thread CPU time" if a.thread_time else "wall time"
    print(f"quant_linear vs fp32 oneDNN Linear ({torch.get_num_threads()} threads, {clock}, {info['cpu_isa']} build); "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)")
    head = f"{'layer':8s} {'M x K x N':>17s} {'fp32 us':>9s}"
    for f in formats:
        head += f" {f + ' us':>9s} {'x fp32':>6s}"
    print(head + "   m=1: weight GB/s, median (best), and best as % of the copy's best")
    for r in rows:
        line = f"{r['layer']:8s} {r['m']:>5d}x{r['k']:>4d}x{r['n']:<6d} {r['fp32_us']:9.1f}"
        for f in formats:
            line += f" {r[f]['us']:9.1f} {r[f]['speedup_vs_fp32']:5.1f}x" if f in r else f" {'-':>9s} {'-':>6s}"
        if r["m"] == 1:
            line += "  " + "  ".join(f"{f} {r[f]['gb_s']:.1f} ({r[f]['gb_s_best']:.1f}) GB/s "
                                     f"{100 * r[f]['gb_s_best'] * 1e9 / copy_bw:.0f}%" for f in formats if f in r)
        print(line)
    print(json.dumps({"bench": "quant_linear", "machine": platform.machine(), "cpu_isa": info["cpu_isa"],
                      "threads": torch.get_num_threads(), "thread_time": a.thread_time, "copy_gb_s": copy_bw / 1e9, "rows": rows}))


if __name__ == "__main__":
    main()
