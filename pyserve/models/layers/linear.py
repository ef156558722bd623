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

from pyserve.distributed.state import tensor_parallel
from pyserve.models.layers.parallel import Partition, even_split
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
    quantized (QuantizedMethod), anything else is dense.

    Tensor parallelism (layers/parallel.py): `parallel="column"` keeps this rank's share of every
    output shard (an equal share, or `shard_ranges[name]` = (start, size) where given: replicated KV
    heads, the vocabulary); `parallel="row"` keeps its share of the input columns and sums the output
    over ranks. Sizes given are the checkpoint's; `in_features`/`out_features` are this rank's."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 output_shards: dict[str, int] | None = None, dtype: torch.dtype, device: torch.device,
                 method: LinearMethod | None = None, parallel: str | None = None,
                 shard_ranges: dict[str | None, tuple[int, int]] | None = None):
        tp = tensor_parallel()
        partition = bias_partition = None
        self.reduce_over = None  # the group a row-parallel layer sums its output over
        self.bias_here = bias
        if parallel is not None and tp.size > 1:
            if parallel == "column":
                full = dict(output_shards or {None: out_features})
                take = {name: (shard_ranges or {}).get(name) or even_split(size, tp, f"{name} output rows" if name else "output rows")
                        for name, size in full.items()}
                partition = bias_partition = Partition(0, full, take)
                local = {name: size for name, (_, size) in take.items()}
                out_features = sum(local.values())
                output_shards = local if output_shards else None
            elif parallel == "row":
                start, size = even_split(in_features, tp, "input columns")
                partition = Partition(1, {None: in_features}, {None: (start, size)})
                in_features = size
                self.reduce_over = tp
                self.bias_here = bias and tp.rank == 0  # the sum adds it once
            else:
                raise ValueError(f"parallel must be column or row, got {parallel!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = Weight((out_features, in_features), dtype, device, output_shards, partition)
        self.bias = Weight((out_features,), dtype, device, output_shards, bias_partition) if bias else None
        self.method = method
        self.state: Any = None

    def weights(self) -> dict[str, Weight]:
        return {"weight": self.weight, **({"bias": self.bias} if self.bias is not None else {})}

    def finish_loading(self, quantize_to: int | None = None) -> None:
        """quantize_to: a ggml type to quantize a dense weight to (HF checkpoints, --quantization)."""
        if quantize_to is not None and not self.weight.quantized:
            self.weight.quantize(quantize_to)
        bias = self.bias.data if self.bias is not None and self.bias_here else None
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
        y = self.method.apply(self.state, x)
        return y if self.reduce_over is None else self.reduce_over.all_reduce(y)

    def warm_up(self, max_rows: int) -> None:
        self.method.warm_up(self.state, max_rows)
