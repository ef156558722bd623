"""Sampling microbenchmark: pyserve's sample against a torch sort-based sampler.

Default shape is a decode step of the default model: batch 32 x vocab 49152
random fp32 logits, every row seeded. Cases: top-p 0.9 + top-k 50 at
temperature 0.8 (the headline), top-p 0.9 alone, plain temperature 0.8. The
torch baseline is the usual recipe: logits / T, one full descending sort, a
top-k mask and a cumsum top-p mask on the sorted probabilities, scatter back,
softmax, torch.multinomial, plus the sampled token's raw log-softmax (pyserve
returns it too). Both run in the same process on the same logits. Prints
median microseconds per call, effective GB/s (logits bytes / time) and the
ratio, as a table and one JSON line; also the minimum per call, which
shared machines distort less.

Then the cost of an allowed-token bitmask (structured outputs): pyserve's
sample without and with a random mask (--mask-density of the ids allowed, the
rest of each row's words random too) on the same logits, the two interleaved
in one timing loop, for the headline case, plain temperature and greedy.

    python bench/kernels/bench_sampling.py [--device cuda] [--dtype bfloat16] [--threads N] [--mask-density D]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import timed_side_by_side  # noqa: E402


def torch_sampler(logits, temperature, top_k, top_p, generator):
    """Sort-based top-k / top-p sampling as most PyTorch servers write it."""
    x = logits.float()
    logprobs = torch.log_softmax(x, dim=-1)
    x = x / temperature[:, None]
    if top_k is not None or top_p is not None:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        if top_k is not None:
            pos = torch.arange(x.shape[-1], device=x.device)
            sorted_x = sorted_x.masked_fill(pos[None, :] >= top_k[:, None], float("-inf"))
        if top_p is not None:
            probs = torch.softmax(sorted_x, dim=-1)
            # Drop a token when the mass strictly before it already reaches p.
            before = torch.cumsum(probs, dim=-1) - probs
            sorted_x = sorted_x.masked_fill(before >= top_p[:, None], float("-inf"))
        x = torch.empty_like(x).scatter_(-1, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return token, logprobs.gather(1, token[:, None]).squeeze(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for both sides (0: torch's default)")
    p.add_argument("--mask-density", type=float, default=0.5, help="fraction of ids the bitmask allows")
    p.add_argument("--thread-time", action="store_true",
                   help="CPU, one thread: time the calling thread's CPU time, not wall time (a busy shared machine)")
    a = p.parse_args()
    if a.thread_time:
        if a.device != "cpu" or a.threads not in (0, 1):
            p.error("--thread-time is for --device cpu with one thread")
        a.threads = 1
    if a.threads:
        torch.set_num_threads(a.threads)

    dev, dtype, B, V = a.device, getattr(torch, a.dtype), a.batch, a.vocab
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, V, generator=gen) * 2).to(dtype).to(dev)
    torch_gen = torch.Generator(device=dev).manual_seed(0)

    def full(v, t):
        return torch.full((B,), v, dtype=t, device=dev)

    seeds = torch.randint(0, 2**62, (B,), generator=gen).to(dev)
    steps = torch.zeros(B, dtype=torch.int64, device=dev)
    ones, zeros = full(1.0, torch.float32), full(0.0, torch.float32)
    cases = [
        ("top_p 0.9 + top_k 50, T 0.8", 0.8, 50, 0.9),
        ("top_p 0.9, T 0.8", 0.8, 0, 0.9),
        ("temperature 0.8", 0.8, 0, 1.0),
    ]
    logits_bytes = logits.numel() * logits.element_size()
    rows = []
    for name, T, k, top_p in cases:
        temp, kk, pp = full(T, torch.float32), full(k, torch.int32), full(top_p, torch.float32)

        def ours():
            steps.add_(1)  # a fresh draw each call, like a decode loop
            return _ops.sample(logits, temp, kk, pp, zeros, seeds, steps, ones, zeros, zeros)

        def baseline():
            return torch_sampler(logits, temp, kk.long() if k > 0 else None, pp if top_p < 1 else None, torch_gen)

        times = timed_side_by_side({"ours": ours, "torch": baseline}, a.iters, a.warmup, dev, a.thread_time)
        (t_ours, min_ours), (t_torch, min_torch) = times["ours"], times["torch"]
        rows.append({"case": name, "pyserve_us": t_ours * 1e6, "torch_us": t_torch * 1e6,
                     "ratio": t_torch / t_ours, "pyserve_gbps": logits_bytes / t_ours / 1e9,
                     "torch_gbps": logits_bytes / t_torch / 1e9, "pyserve_min_us": min_ours * 1e6,
                     "torch_min_us": min_torch * 1e6, "ratio_of_mins": min_torch / min_ours})

    # The bitmask: bit id % 32 of word id // 32, --mask-density of the ids allowed.
    words = (V + 31) // 32
    bits = (torch.rand(B, words * 32, generator=gen) < a.mask_density).long().view(B, words, 32)
    packed = (bits << torch.arange(32)).sum(-1)
    mask = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).to(dev)
    mask_cases = [
        ("top_p 0.9 + top_k 50, T 0.8", 0.8, 50, 0.9),
        ("temperature 0.8", 0.8, 0, 1.0),
        ("greedy", 0.0, 0, 1.0),
    ]
    mask_rows = []
    for name, T, k, top_p in mask_cases:
        temp, kk, pp = full(T, torch.float32), full(k, torch.int32), full(top_p, torch.float32)

        def plain():
            steps.add_(1)
            return _ops.sample(logits, temp, kk, pp, zeros, seeds, steps, ones, zeros, zeros)

        def masked():
            steps.add_(1)
            return _ops.sample(logits, temp, kk, pp, zeros, seeds, steps, ones, zeros, zeros,
                               allowed_token_bitmask=mask)

        times = timed_side_by_side({"plain": plain, "masked": masked}, a.iters, a.warmup, dev, a.thread_time)
        (t_plain, min_plain), (t_mask, min_mask) = times["plain"], times["masked"]
        mask_rows.append({"case": name, "plain_us": t_plain * 1e6, "masked_us": t_mask * 1e6,
                          "overhead": t_mask / t_plain - 1, "plain_min_us": min_plain * 1e6,
                          "masked_min_us": min_mask * 1e6, "overhead_of_mins": min_mask / min_plain - 1})

    info = pyserve.build_info() if hasattr(pyserve, "build_info") else {}
    print(f"sampling: batch {B} x vocab {V}, {a.dtype} logits on {dev} "
          f"({torch.get_num_threads()} threads, {info.get('cpu_isa', '?')}"
          f"{', thread CPU time' if a.thread_time else ''})")
    print(f"{'case (median; min)':30s} {'pyserve us':>11s} {'torch us':>10s} {'ratio':>7s} {'pyserve GB/s':>13s} "
          f"{'torch GB/s':>11s} {'min: pyserve':>13s} {'torch':>9s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['case']:30s} {r['pyserve_us']:11.1f} {r['torch_us']:10.1f} {r['ratio']:6.2f}x "
              f"{r['pyserve_gbps']:13.2f} {r['torch_gbps']:11.2f} {r['pyserve_min_us']:13.1f} "
              f"{r['torch_min_us']:9.1f} {r['ratio_of_mins']:6.2f}x")
    print(f"\nallowed-token bitmask ({a.mask_density:.0%} of ids allowed), pyserve only:")
    print(f"{'case (median; min)':30s} {'no mask us':>11s} {'mask us':>10s} {'cost':>7s} {'min: no mask':>13s} "
          f"{'mask':>9s} {'cost':>7s}")
    for r in mask_rows:
        print(f"{r['case']:30s} {r['plain_us']:11.1f} {r['masked_us']:10.1f} {100 * r['overhead']:+6.1f}% "
              f"{r['plain_min_us']:13.1f} {r['masked_min_us']:9.1f} {100 * r['overhead_of_mins']:+6.1f}%")
    print(json.dumps({"bench": "sample", "device": dev, "dtype": a.dtype, "batch": B, "vocab": V,
                      "machine": platform.machine(), "threads": torch.get_num_threads(), "rows": rows,
                      "thread_time": a.thread_time, "mask_density": a.mask_density, "mask_rows": mask_rows}))


if __name__ == "__main__":
    main()
