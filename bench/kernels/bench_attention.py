"""Paged-attention decode microbenchmark against torch SDPA on contiguous K/V.

Default shape is the default model's decode step: batch 32, context 1024,
9 query heads over 3 KV heads, head_dim 64, block size 16. Both sides run in
the same process, on the same data: pyserve reads K/V through block tables
from a paged cache whose blocks are shuffled; torch's SDPA gets the same K/V
already gathered into contiguous [batch, kv_heads, context, head_dim] tensors
(the gather is not timed). Prints median microseconds per call, effective GB/s
(K/V bytes read / time) and the ratio, as a table and one JSON line.

    python bench/kernels/bench_attention.py [--device cuda] [--dtype bfloat16]

--sliding-window W and --soft-cap C time the kernel with those options; the
torch rows then get the same work (SDPA over the last W keys; with a soft-cap,
which SDPA cannot do, an eager matmul / tanh / softmax / matmul as in
transformers' Gemma 2). --baseline LIB (a library from build_baseline.py, e.g.
the last commit's kernels) adds that build's paged_attention, called without
the new options, interleaved with the others: before/after in one run.
--cache-dtype bfloat16|float16 (with --dtype float32, CPU) adds a row that reads
the same K/V from a cache in that dtype (--kv-cache-dtype's path), and prints
its time against the fp32-cache row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys

import torch
import torch.nn.functional as F

import pyserve
from pyserve import _ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import cuda_copy_bandwidth, timed_side_by_side  # noqa: E402
import build_baseline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--num-heads", type=int, default=9)
    p.add_argument("--num-kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument("--sequential-blocks", action="store_true", help="lay each sequence's blocks out in order (no scatter)")
    p.add_argument("--sliding-window", type=int, default=0, help="keys each query sees (0 = off)")
    p.add_argument("--soft-cap", type=float, default=0.0, help="logit soft-cap (0 = off)")
    p.add_argument("--cache-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="also time an fp32 query over a cache of this dtype (--kv-cache-dtype)")
    p.add_argument("--baseline", default=None, help="library from build_baseline.py to time side by side")
    p.add_argument("--thread-time", action="store_true",
                   help="time with the thread's CPU clock (needs --threads 1): robust on a busy machine")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.thread_time and (a.device != "cpu" or torch.get_num_threads() != 1):
        p.error("--thread-time needs --device cpu and --threads 1 (the kernel must run on the calling thread)")
    dtype = getattr(torch, a.dtype)
    dev = a.device
    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = math.ceil(a.context / a.block_size)
    num_blocks = a.batch * blocks_per_seq
    cache_shape = (num_blocks, a.block_size, a.num_kv_heads, a.head_dim)
    key_cache = torch.randn(cache_shape, generator=gen).to(dtype).to(dev)
    value_cache = torch.randn(cache_shape, generator=gen).to(dtype).to(dev)
    order = torch.arange(num_blocks) if a.sequential_blocks else torch.randperm(num_blocks, generator=gen)
    block_tables = order.view(a.batch, blocks_per_seq).int().to(dev)
    seq_lens = torch.full((a.batch,), a.context, dtype=torch.int32, device=dev)
    qsl = torch.arange(a.batch + 1, dtype=torch.int32, device=dev)
    query = torch.randn(a.batch, a.num_heads, a.head_dim, generator=gen).to(dtype).to(dev)
    scale = 1.0 / math.sqrt(a.head_dim)

    # Contiguous copies of the same K/V for SDPA: [batch, kv_heads, context, head_dim].
    def gather(cache):
        g = cache[block_tables.long()]  # [batch, blocks, block_size, kv_heads, D]
        g = g.reshape(a.batch, blocks_per_seq * a.block_size, a.num_kv_heads, a.head_dim)[:, : a.context]
        return g.transpose(1, 2).contiguous()

    # A decode query sits at position context - 1: with a window it sees the last W keys.
    keys_read = min(a.context, a.sliding_window) if a.sliding_window > 0 else a.context
    k, v = gather(key_cache)[:, :, -keys_read:].contiguous(), gather(value_cache)[:, :, -keys_read:].contiguous()
    group = a.num_heads // a.num_kv_heads
    k_rep, v_rep = k.repeat_interleave(group, 1).contiguous(), v.repeat_interleave(group, 1).contiguous()
    q4 = query.unsqueeze(2)  # [batch, heads, 1, D]
    window = a.sliding_window or None
    cap = a.soft_cap or None

    def ours():
        return _ops.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, qsl, scale, a.context,
                                    window, cap)

    def sdpa_gqa():
        return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    def sdpa_expanded():
        return F.scaled_dot_product_attention(q4, k_rep, v_rep, scale=scale)

    def eager_soft_cap():  # transformers' Gemma 2 eager attention, one decode step
        scores = torch.matmul(q4, k_rep.transpose(2, 3)) * scale
        scores = torch.tanh(scores / a.soft_cap) * a.soft_cap
        return torch.matmul(scores.softmax(-1), v_rep)

    def reference():
        scores = torch.matmul(q4.float(), k_rep.float().transpose(2, 3)) * scale
        if cap:
            scores = torch.tanh(scores / a.soft_cap) * a.soft_cap
        return torch.matmul(scores.softmax(-1), v_rep.float()).squeeze(2)

    # Same answer first, then time.
    tol = dict(atol=2e-2 if dtype != torch.float32 else 1e-4, rtol=1e-2)
    torch.testing.assert_close(ours().float(), reference(), **tol)

    kv_bytes = 2 * a.batch * keys_read * a.num_kv_heads * a.head_dim * key_cache.element_size()
    options = ", ".join(([f"window {a.sliding_window}"] if window else []) + ([f"soft-cap {a.soft_cap}"] if cap else []))
    fns = {f"pyserve paged_attention{f' ({options})' if options else ''}": ours}
    if a.baseline:
        base_ops = build_baseline.load(a.baseline)

        def baseline():
            return base_ops.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, qsl, scale, a.context)

        if not window and not cap:
            torch.testing.assert_close(baseline().float(), reference(), **tol)
        fns["pyserve baseline build (no window, no cap)"] = baseline
    mixed_name = None
    if a.cache_dtype and a.cache_dtype != a.dtype:
        low_k, low_v = key_cache.to(getattr(torch, a.cache_dtype)), value_cache.to(getattr(torch, a.cache_dtype))

        def mixed():
            return _ops.paged_attention(query, low_k, low_v, block_tables, seq_lens, qsl, scale, a.context, window, cap)

        # Its own rounding of K/V aside, the same answer (bf16: ~3 significant digits per value).
        torch.testing.assert_close(mixed().float(), reference(), atol=3e-2, rtol=3e-2)
        mixed_name = f"pyserve paged_attention ({a.cache_dtype} cache)"
        fns[mixed_name] = mixed
    if cap:
        fns["torch eager (Gemma 2 style)"] = eager_soft_cap
    else:
        fns["torch SDPA (enable_gqa)"] = sdpa_gqa
        fns["torch SDPA (K/V repeated per head)"] = sdpa_expanded
    times = timed_side_by_side(fns, a.iters, a.warmup, dev, thread_time=a.thread_time, shuffle=True)
    # The baseline (no window) reads every key.
    full_bytes = kv_bytes * a.context // keys_read
    def bytes_read(name):
        if name.startswith("pyserve baseline"):
            return full_bytes
        if name == mixed_name:
            return kv_bytes * getattr(torch, a.cache_dtype).itemsize // key_cache.element_size()
        return kv_bytes

    rows = [{"name": name, "median_us": t * 1e6, "min_us": t_min * 1e6, "gbps": bytes_read(name) / t / 1e9}
            for name, (t, t_min) in times.items()]
    best_torch = min((r for r in rows if r["name"].startswith("torch")), key=lambda r: r["median_us"])
    ratio = best_torch["median_us"] / rows[0]["median_us"]

    print(f"paged attention decode: batch {a.batch} x context {a.context}, {a.num_heads}/{a.num_kv_heads} heads, "
          f"head_dim {a.head_dim}, block {a.block_size}, {a.dtype} on {dev} "
          f"({torch.get_num_threads()} threads, {pyserve.build_info()['cpu_isa']}"
          f"{', thread CPU time' if a.thread_time else ''})"
          + (f", {options}" if options else ""))
    width = max(38, max(len(r["name"]) for r in rows))
    print(f"{'kernel':{width}s} {'median us':>10s} {'min us':>10s} {'GB/s':>8s}")
    for r in rows:
        print(f"{r['name']:{width}s} {r['median_us']:10.1f} {r['min_us']:10.1f} {r['gbps']:8.2f}")
    print(f"speed-up of pyserve over the fastest torch row: {ratio:.2f}x")
    if a.baseline:
        base = rows[1]
        print(f"pyserve now / baseline build: {rows[0]['median_us'] / base['median_us']:.3f} (median), "
              f"{rows[0]['min_us'] / base['min_us']:.3f} (min)")
    extra = {}
    if mixed_name:
        m = next(r for r in rows if r["name"] == mixed_name)
        extra["cache_dtype"] = a.cache_dtype
        extra["cache_dtype_over_same_dtype"] = m["median_us"] / rows[0]["median_us"]
        print(f"{a.cache_dtype} cache / {a.dtype} cache: {m['median_us'] / rows[0]['median_us']:.3f} (median), "
              f"{m['min_us'] / rows[0]['min_us']:.3f} (min)")
    if dev == "cuda":
        # Attention only reads K/V; the copy figure counts reads and writes, so
        # the two are directly comparable as bytes moved per second.
        copy_gbps = cuda_copy_bandwidth() / 1e9
        extra = {"gpu": torch.cuda.get_device_name(), "copy_gbps": copy_gbps,
                 "fraction_of_copy_bandwidth": rows[0]["gbps"] / copy_gbps}
        print(f"{extra['gpu']}: device-to-device copy {copy_gbps:.0f} GB/s (read + write); pyserve decode attention "
              f"reaches {extra['fraction_of_copy_bandwidth']:.0%} of it")
    print(json.dumps({"bench": "paged_attention_decode", "device": dev, "dtype": a.dtype, "machine": platform.machine(),
                      "batch": a.batch, "context": a.context, "sliding_window": a.sliding_window,
                      "soft_cap": a.soft_cap, "threads": torch.get_num_threads(), "thread_time": a.thread_time,
                      "rows": rows,
                      "ratio_vs_best_torch": ratio, **extra}))


if __name__ == "__main__":
    main()
