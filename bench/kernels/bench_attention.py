"""Paged-attention decode microbenchmark against torch SDPA on contiguous K/V.

Default shape is the default model's decode step: batch 32, context 1024,
9 query heads over 3 KV heads, head_dim 64, block size 16. Both sides run in
the same process, on the same data: pyserve reads K/V through block tables
from a paged cache whose blocks are shuffled; torch's SDPA gets the same K/V
already gathered into contiguous [batch, kv_heads, context, head_dim] tensors
(the gather is not timed). Prints median microseconds per call, effective GB/s
(K/V bytes read / time) and the ratio, as a table and one JSON line.

    python bench/kernels/bench_attention.py [--device cuda] [--dtype bfloat16]
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
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
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

    k, v = gather(key_cache), gather(value_cache)
    group = a.num_heads // a.num_kv_heads
    k_rep, v_rep = k.repeat_interleave(group, 1).contiguous(), v.repeat_interleave(group, 1).contiguous()
    q4 = query.unsqueeze(2)  # [batch, heads, 1, D]

    def ours():
        return _ops.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, qsl, scale, a.context)

    def sdpa_gqa():
        return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    def sdpa_expanded():
        return F.scaled_dot_product_attention(q4, k_rep, v_rep, scale=scale)

    # Same answer first, then time.
    ref = sdpa_expanded().squeeze(2).float()
    torch.testing.assert_close(ours().float(), ref, atol=2e-2 if dtype != torch.float32 else 1e-4, rtol=1e-2)

    kv_bytes = 2 * a.batch * a.context * a.num_kv_heads * a.head_dim * key_cache.element_size()
    fns = {"pyserve paged_attention": ours, "torch SDPA (enable_gqa)": sdpa_gqa,
           "torch SDPA (K/V repeated per head)": sdpa_expanded}
    times = timed_side_by_side(fns, a.iters, a.warmup, dev)
    rows = [{"name": name, "median_us": t * 1e6, "min_us": t_min * 1e6, "gbps": kv_bytes / t / 1e9}
            for name, (t, t_min) in times.items()]
    best_torch = min(rows[1:], key=lambda r: r["median_us"])
    ratio = best_torch["median_us"] / rows[0]["median_us"]

    print(f"paged attention decode: batch {a.batch} x context {a.context}, {a.num_heads}/{a.num_kv_heads} heads, "
          f"head_dim {a.head_dim}, block {a.block_size}, {a.dtype} on {dev} "
          f"({torch.get_num_threads()} threads, {pyserve.build_info()['cpu_isa']})")
    print(f"{'kernel':38s} {'median us':>10s} {'GB/s':>8s}")
    for r in rows:
        print(f"{r['name']:38s} {r['median_us']:10.1f} {r['gbps']:8.2f}")
    print(f"speed-up of pyserve over the faster torch SDPA: {ratio:.2f}x")
    extra = {}
    if dev == "cuda":
        # Attention only reads K/V; the copy figure counts reads and writes, so
        # the two are directly comparable as bytes moved per second.
        copy_gbps = cuda_copy_bandwidth() / 1e9
        extra = {"gpu": torch.cuda.get_device_name(), "copy_gbps": copy_gbps,
                 "fraction_of_copy_bandwidth": rows[0]["gbps"] / copy_gbps}
        print(f"{extra['gpu']}: device-to-device copy {copy_gbps:.0f} GB/s (read + write); pyserve decode attention "
              f"reaches {extra['fraction_of_copy_bandwidth']:.0%} of it")
    print(json.dumps({"bench": "paged_attention_decode", "device": dev, "dtype": a.dtype, "machine": platform.machine(),
                      "batch": a.batch, "context": a.context, "threads": torch.get_num_threads(), "rows": rows,
                      "ratio_vs_best_torch": ratio, **extra}))


if __name__ == "__main__":
    main()
