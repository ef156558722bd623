"""y = x Wᵀ + b with the weight laid out once, at load, for the matmul library that will run it.

On the CPU, torch's `F.linear` in fp32 goes to MKL, which on AMD CPUs runs its AVX2 kernels: measured on
the 2-core AMD EPYC (avx512) that the serving benchmark uses, a [32, 576] × [576, 3072] matmul runs at
~120 GFLOP/s through MKL and ~215 through oneDNN with the weight pre-reordered into oneDNN's blocked layout,
and the [32, 576] × [576, 49152] vocab projection at ~65 against ~180 (see bench/kernels/bench_linear.py).
oneDNN's result for a row also does not depend on how many rows share the call (MKL's does, in the last
bits), which keeps greedy decoding batch-invariant. Elsewhere (CUDA, or a torch without oneDNN) the
weight stays as it is and `F.linear` runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _onednn_usable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear:
    """A frozen linear layer. weight: [out_features, in_features]; bias: [out_features] or None."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = bias
        self.packed = _onednn_usable(weight)
        # The reordered copy replaces the dense weight (the caller may keep its own, e.g. a tied embedding).
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] → [..., out_features], in x's dtype."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
