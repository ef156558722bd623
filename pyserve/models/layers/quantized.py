"""Weights kept in GGUF's block formats, and the linear method that runs them with pyserve's own
quantized matmul kernels (pyserve._C: quant_pack / quant_linear_out / quant_dequant_rows).

A GGUF file's weight arrives as a QuantizedTensor: its rows of blocks as stored in the file. The
layer packs them once, at load, into the layout the kernel reads; activations are quantized to int8
per block inside the kernel. A fused layer whose shards have different types (Q4_K_M files keep
some attn_v in Q6_K beside a Q4_K attn_q) runs one kernel call per shard, each writing its own
columns of the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pyserve import _ops

from pyserve.loader.gguf_types import BLOCK_LAYOUT, GGMLType

# The ggml types our CPU kernels run; others are dequantized at load, as before.
KERNEL_TYPES = frozenset({GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K})
# --quantization for HF checkpoints: name -> ggml type the linear weights are quantized to at load.
QUANTIZATIONS = {"q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0}


@dataclass
class QuantizedTensor:
    """A 2-D weight [rows, in_features] as GGUF blocks: `blocks` is uint8 [rows, row_bytes]."""
    blocks: torch.Tensor
    ggml_type: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks.shape[0], self.in_features)

    def take_rows(self, index: torch.Tensor) -> "QuantizedTensor":
        """Rows reordered (llama.cpp's q/k permutation is a row permutation; blocks never span rows)."""
        return QuantizedTensor(self.blocks[index].contiguous(), self.ggml_type, self.in_features)

    def dequantize(self) -> torch.Tensor:
        from pyserve.loader.gguf_dequant import dequantize

        return torch.from_numpy(np.ascontiguousarray(dequantize(self.blocks.numpy(), self.ggml_type)))

    @staticmethod
    def row_bytes(ggml_type: int, in_features: int) -> int:
        block, block_bytes = BLOCK_LAYOUT[ggml_type]
        return in_features // block * block_bytes


def kernel_runs(ggml_type: int, in_features: int) -> bool:
    return ggml_type in KERNEL_TYPES and in_features % BLOCK_LAYOUT[ggml_type][0] == 0


@dataclass
class _Shard:
    packed: torch.Tensor
    ggml_type: int
    start: int  # first output column
    rows: int


class PackedQuantized:
    """One or more packed weights covering the output columns, and an optional fp32 bias."""

    def __init__(self, shards: list[tuple[QuantizedTensor, int]], bias: torch.Tensor | None):
        """shards: (weight, first output column), in order."""
        self.in_features = shards[0][0].in_features
        self.out_features = sum(q.shape[0] for q, _ in shards)
        self.bias = None if bias is None else bias.float().contiguous()
        self.shards = [_Shard(_ops.quant_pack(q.blocks, q.ggml_type, q.in_features), q.ggml_type,
                              start, q.shape[0]) for q, start in _merge_same_type(shards)]
        # The op itself, not its Python wrapper: a 1B model's decode step makes ~65 of these calls,
        # and each layer of Python costs microseconds that a 100 us matmul notices.
        self._linear = torch.ops.pyserve.quant_linear.default

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features] in x's dtype (the kernels take and give fp32)."""
        if len(self.shards) == 1 and x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
            s = self.shards[0]
            return self._linear(x, s.packed, s.ggml_type, s.rows, self.in_features, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if len(self.shards) == 1:
            s = self.shards[0]
            y = _ops.quant_linear(x2, s.packed, s.ggml_type, s.rows, self.in_features, self.bias)
        else:
            y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
            for s in self.shards:
                bias = None if self.bias is None else self.bias[s.start: s.start + s.rows]
                _ops.quant_linear_out(x2, s.packed, s.ggml_type, s.rows, self.in_features, bias,
                                                   y[:, s.start: s.start + s.rows])
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight, dequantized to fp32 (the token embedding): [n, in_features]."""
        s = self.shards[0]
        return _ops.quant_dequant_rows(s.packed, ids, s.ggml_type, s.rows, self.in_features)


def _merge_same_type(shards: list[tuple[QuantizedTensor, int]]) -> list[tuple[QuantizedTensor, int]]:
    """Neighbouring shards of one type as one matrix, so that they take one kernel call (a Q4_K_M file's
    Q4_K attn_q and attn_k together, its Q6_K attn_v apart)."""
    merged: list[tuple[list[QuantizedTensor], int]] = []
    for q, start in shards:
        if merged and merged[-1][0][-1].ggml_type == q.ggml_type:
            merged[-1][0].append(q)
        else:
            merged.append(([q], start))
    return [(qs[0] if len(qs) == 1 else QuantizedTensor(torch.cat([q.blocks for q in qs]), qs[0].ggml_type,
                                                         qs[0].in_features), start) for qs, start in merged]


class QuantizedMethod:
    """The LinearMethod for weights in GGUF block formats (or quantized to one at load)."""

    def prepare(self, weight, bias: torch.Tensor | None) -> PackedQuantized:
        """weight: the layer's Weight holding QuantizedTensors (per shard or whole)."""
        return PackedQuantized(weight.quantized_shards(), bias)

    def apply(self, state: PackedQuantized, x: torch.Tensor) -> torch.Tensor:
        return state(x)

    def warm_up(self, state: PackedQuantized, max_rows: int) -> None:
        """Nothing is built per shape: the kernels are plain code, not JIT primitives."""


def quantize(weight: torch.Tensor, ggml_type: int) -> QuantizedTensor:
    """A dense [rows, in] weight quantized to ggml_type blocks, as ggml's reference quantizer does."""
    w = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return QuantizedTensor(_ops.quantize_rows(w, ggml_type), ggml_type, w.shape[1])
