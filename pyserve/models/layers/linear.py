"""Linear layers, and the seam for how their weights are stored and applied.

A layer owns a Weight (filled by the loader, possibly from several checkpoint tensors) and a
LinearMethod that turns it, once loaded, into whatever the method runs (`prepare`) and applies it to
activations (`apply`). The default method keeps the dense weight, laid out for oneDNN on the CPU
(models/linear.py); quantized formats and tensor-parallel shards are further methods, so model
files never change for them.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pyserve.models.layers.quantized import QuantizedMethod
from pyserve.models.layers.weight import Weight
from pyserve.models.linear import Linear as PackedMatmul


class LinearMethod(Protocol):
    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        """The loaded dense weight [out, in] (and bias [out]) -> the method's own state."""

    def apply(self, state: Any, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""

    def warm_up(self, state: Any, max_rows: int) -> None:
        """Build whatever the method caches per shape, for calls of up to max_rows rows."""


class DenseMethod:
    """The weight as it is (fp32/bf16/fp16), through oneDNN with a pre-reordered weight on the CPU."""

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedMatmul:
        return PackedMatmul(weight, bias)

    def apply(self, state: PackedMatmul, x: torch.Tensor) -> torch.Tensor:
        return state(x)

    def warm_up(self, state: PackedMatmul, max_rows: int) -> None:
        state.warm_up_shapes(max_rows)


class LinearLayer:
    """y = x Wᵀ + b. `output_shards` names the checkpoint tensors fused into W's rows, in order
    (e.g. {"q": q_size, "k": kv_size, "v": kv_size}); the bias, if any, is sharded alike.
    The method, unless given, follows what the checkpoint held: GGUF blocks our kernels run stay
    quantized (QuantizedMethod), anything else is dense."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 output_shards: dict[str, int] | None = None, dtype: torch.dtype, device: torch.device,
                 method: LinearMethod | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.weight = Weight((out_features, in_features), dtype, device, output_shards)
        self.bias = Weight((out_features,), dtype, device, output_shards) if bias else None
        self.method = method
        self.state: Any = None

    def weights(self) -> dict[str, Weight]:
        return {"weight": self.weight, **({"bias": self.bias} if self.bias is not None else {})}

    def finish_loading(self, quantize_to: int | None = None) -> None:
        """quantize_to: a ggml type to quantize a dense weight to (HF checkpoints, --quantization)."""
        if quantize_to is not None and not self.weight.quantized:
            self.weight.quantize(quantize_to)
        bias = self.bias.data if self.bias is not None else None
        if self.method is None:
            self.method = QuantizedMethod() if self.weight.is_quantized else DenseMethod()
        if isinstance(self.method, QuantizedMethod):
            self.state = self.method.prepare(self.weight, bias)
            self.weight.quantized = {}
        else:
            self.weight.densify()
            self.state = self.method.prepare(self.weight.data, bias)
        self.weight.data = None  # the method holds what it needs (e.g. oneDNN's reordered copy)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self.state, x)

    def warm_up(self, max_rows: int) -> None:
        self.method.warm_up(self.state, max_rows)
