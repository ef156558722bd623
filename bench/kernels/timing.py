"""Side-by-side timing for the kernel benchmarks."""

from __future__ import annotations

import random
import statistics
import time

import torch

# On CUDA each sample times this many back-to-back calls between two events, so
# that the launch latency of one call hides behind the previous one's work and
# the figure is the kernel's, as it is inside a forward pass.
CUDA_CALLS_PER_SAMPLE = 20


def timed_side_by_side(fns: dict, iters: int, warmup: int, device: str,
                       thread_time: bool = False, shuffle: bool = False) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each function. Calls are interleaved
    (A B C A B C ...) so that a noisy neighbour slows all of them alike; the
    min is the robust number on a shared machine. thread_time (CPU, one torch
    thread only): count the calling thread's CPU time instead of wall time,
    so that time slices lost to other processes do not count (their cache
    pollution still does). shuffle: each round calls the functions in a new
    (seeded) random order, so that none always runs right after the same
    neighbour (one that streams a lot of memory leaves a colder cache)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    rng = random.Random(0)
    for _ in range(iters):
        if shuffle:
            rng.shuffle(items)
        for name, fn in items:
            samples[name].append(_cuda_sample(fn) if device == "cuda" else _cpu_sample(fn, thread_time))
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


def _cpu_sample(fn, thread_time: bool = False) -> float:
    clock = time.thread_time if thread_time else time.perf_counter
    start = clock()
    fn()
    return clock() - start


def _cuda_sample(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(CUDA_CALLS_PER_SAMPLE):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / CUDA_CALLS_PER_SAMPLE


def cuda_copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus
    bytes written (so a kernel that only reads N bytes in time t compares as
    (N / t) / this)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t, _ = timed_side_by_side({"copy": lambda: dst.copy_(src)}, iters, 3, "cuda")["copy"]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / t


def cpu_copy_bandwidth(nbytes: int = 1 << 28, iters: int = 10) -> float:
    """Host memory copy bandwidth in bytes/s (torch's copy_ of a buffer far larger than the caches, on the
    intra-op threads), counting bytes read plus bytes written like cuda_copy_bandwidth. A kernel that only
    reads N bytes in time t compares as (N / t) / this; the min sample is the figure (a shared machine)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    _, t = timed_side_by_side({"copy": lambda: dst.copy_(src)}, iters, 2, "cpu")["copy"]
    return 2 * nbytes / t
