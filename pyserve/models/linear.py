"""y = x Wᵀ + b with the weight laid out once, at load, for the matmul library that will run it.

On the CPU, torch's `F.linear` in fp32 goes to MKL, which on AMD CPUs runs its AVX2 kernels: measured on
the 2-core AMD EPYC (avx512) that the serving benchmark uses, a [32, 576] × [576, 3072] matmul runs at
~120 GFLOP/s through MKL and ~215 through oneDNN with the weight pre-reordered into oneDNN's blocked layout,
and the [32, 576] × [576, 49152] vocab projection at ~65 against ~180 (see bench/kernels/bench_linear.py).
oneDNN's result for a row also does not depend on how many rows share the call (MKL's does, in the last
bits), which keeps greedy decoding batch-invariant. Elsewhere (CUDA, or a torch without oneDNN) the
weight stays as it is and `F.linear` runs it.

oneDNN compiles (JIT) one primitive per input shape and keeps it in two LRU caches of 1024 entries each
(oneDNN's primitive cache and ideep's), about 0.6 MB per shape between them, measured. A server's row
count is the number of tokens in the step, different almost every step, so unbucketed it filled those
caches with hundreds of shapes per layer shape, then churned them, and the evictions fragmented the heap:
resident memory grew by ~0.7 MB per request for as long as the server ran (issue 13). So the packed path
runs only a fixed set of row counts (`ROW_BUCKETS`): fewer rows are padded up to the next bucket through a
reused buffer, more are run in chunks of the largest bucket, and `warm_up_shapes` builds every primitive
at startup, so serving creates none.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

# Exact up to 32 rows (decode batches: there a matmul streams the weight, and padding would cost as much
# as the rows it adds), then steps of 1/8 to 1/4 of the row count, so padding costs at most 12.5% of a call
# (25% at 257 rows); more than 512 rows run in 512-row chunks. 60 buckets for each of a model's matmul shapes
# (~0.6 MB of primitives each), all built at warm-up (bench/README.md, "Memory under sustained load").
ROW_BUCKETS: tuple[int, ...] = (*range(1, 33), *range(36, 65, 4), *range(72, 129, 8), *range(144, 257, 16),
                                *range(320, 513, 64))
CHUNK_ROWS = ROW_BUCKETS[-1]
_EXACT_ROWS = 32
_STEPS = ((_EXACT_ROWS, 1), (64, 4), (128, 8), (256, 16), (512, 64))  # (up to rows, bucket step)


def row_bucket(m: int) -> int:
    """The smallest bucket holding m rows (1 <= m <= CHUNK_ROWS)."""
    step = next(step for upto, step in _STEPS if m <= upto)
    return -(-m // step) * step


def _onednn_usable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# Padding buffers, one per (thread, in_features, dtype), shared by every layer: a thread runs one matmul at
# a time, and the rows past those copied in are never read back.
_pad_buffers = threading.local()


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    key = (x.shape[1], x.dtype)
    buffers = _pad_buffers.__dict__
    buf = buffers.get(key)
    if buf is None:
        # A normal tensor, even when first needed under inference_mode: an inference tensor could
        # not be written by a later call made outside it.
        with torch.inference_mode(False):
            buf = buffers[key] = torch.zeros(CHUNK_ROWS, x.shape[1], dtype=x.dtype)
    buf[: x.shape[0]].copy_(x)
    return buf[:rows]


class Linear:
    """A frozen linear layer. weight: [out_features, in_features]; bias: [out_features] or None."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = bias
        self.packed = _onednn_usable(weight)
        self.in_features = weight.shape[1]
        # The reordered copy replaces the dense weight (the caller may keep its own, e.g. a tied embedding).
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] → [..., out_features], in x's dtype."""
        if not self.packed:
            return F.linear(x, self.weight, self.bias)
        if x.dim() == 2 and x.shape[0] <= _EXACT_ROWS:  # a decode step: its own bucket, nothing to add
            return self._run(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        m = x2.shape[0]
        if m == 0:
            y = self._run(x2)
        elif m <= CHUNK_ROWS:
            y = self._run_rows(x2)
        else:
            y = torch.cat([self._run_rows(x2[s: s + CHUNK_ROWS]) for s in range(0, m, CHUNK_ROWS)])
        return y.reshape(*lead, y.shape[-1])

    def _run_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x: [m, in_features], 1 <= m <= CHUNK_ROWS → [m, out_features], through a bucket-sized call."""
        m = x.shape[0]
        rows = row_bucket(m)
        if rows == m:
            return self._run(x.contiguous())
        return self._run(_padded(x, rows))[:m]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    @torch.inference_mode()
    def warm_up_shapes(self, max_rows: int) -> None:
        """Build the primitive for every bucket a call of up to max_rows rows can use."""
        if not self.packed:
            return
        x = torch.zeros(CHUNK_ROWS, self.in_features, dtype=self.weight.dtype)
        for rows in ROW_BUCKETS:
            self._run(x[:rows])
            if rows >= max_rows:
                break
