"""RMSNorm on pyserve's kernels: over the hidden state (optionally fused with the residual add),
and in place over a strided view (each head of q or k inside the fused QKV output, Qwen3 and
Gemma 3; or the whole q or k projection, OLMo 2). `weight_offset=1` is Gemma's `(1 + w)`."""

from __future__ import annotations

import torch

from pyserve import _ops
from pyserve.models.layers.weight import Weight


class RMSNorm:
    def __init__(self, size: int, eps: float, *, dtype: torch.dtype, device: torch.device,
                 weight_offset: float = 0.0):
        self.eps, self.offset = eps, weight_offset
        self.weight = Weight((size,), dtype, device)

    def weights(self) -> dict[str, Weight]:
        return {"weight": self.weight}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, size] -> a new normalised tensor."""
        return _ops.rms_norm(x, self.weight.data, self.eps, self.offset)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        """In place: residual += x; x = norm(residual)."""
        _ops.fused_add_rms_norm(x, residual, self.weight.data, self.eps, self.offset)

    def inplace(self, x: torch.Tensor) -> None:
        """In place over the last dimension of x [tokens, size] or [tokens, heads, size], a view
        whose last dimension is dense (no copy)."""
        _ops.rms_norm_inplace(x, self.weight.data, self.eps, self.offset)
