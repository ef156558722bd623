"""Side-by-side timing for the kernel benchmarks."""

from __future__ import annotations

import statistics
import time

import torch


def timed_side_by_side(fns: dict, iters: int, warmup: int, device: str) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each function. Calls are interleaved
    (A B C A B C ...) so that a noisy neighbour slows all of them alike; the
    min is the robust number on a shared machine."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}
