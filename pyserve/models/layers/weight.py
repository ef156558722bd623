"""A tensor of a layer that a checkpoint fills: whole, or as named row ranges (shards) when the layer
fuses several checkpoint tensors (q/k/v into one projection, gate/up into one)."""

from __future__ import annotations

import torch

from pyserve.loader.hf import ModelLoadError
from pyserve.models.layers.quantized import QuantizedTensor, kernel_runs


class MissingWeightError(ModelLoadError):
    """A weight the architecture needs is absent or has the wrong shape."""


class Weight:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 shards: dict[str, int] | None = None, partition=None):
        """shards: name -> rows, in order (they must add up to shape[0]); None: filled whole.
        partition: which slice of each checkpoint tensor this tensor-parallel rank keeps (layers/parallel.py);
        shape and shards are then this rank's."""
        self.shape = tuple(shape)
        self.partition = partition
        self.dtype = dtype
        self.device = device
        self.data: torch.Tensor | None = None
        self.shards: dict[str | None, tuple[int, int]] = {None: (0, self.shape[0])}
        if shards:
            offsets, start = {}, 0
            for name, rows in shards.items():
                offsets[name] = (start, rows)
                start += rows
            if start != self.shape[0]:
                raise ValueError(f"shards of {start} rows for a weight of {self.shape[0]}")
            self.shards = offsets
        self.loaded: set[str | None] = set()
        # Shards (or the whole weight, under None) that arrived in a GGUF block format and are kept so.
        self.quantized: dict[str | None, QuantizedTensor] = {}

    def load(self, name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        """Fill the whole weight or one shard from checkpoint tensor `name`. A checkpoint that fuses
        what others store apart (Phi-3's qkv_proj, gate_up_proj) fills every shard at once."""
        if shard is None and None not in self.shards:
            if self.loaded:
                raise MissingWeightError(f"weight {name!r} overlaps the separate tensors also in the checkpoint")
            self.shards = {None: (0, self.shape[0])}
        if shard not in self.shards:
            raise MissingWeightError(f"weight {name!r}: no shard {shard!r} here (shards: {list(self.shards)})")
        start, rows = self.shards[shard]
        want = (rows, *self.shape[1:])
        if self.partition is not None:
            want = self.partition.checkpoint_shape(want, shard)
        if tuple(tensor.shape) != want:
            raise MissingWeightError(f"weight {name!r} has shape {tuple(tensor.shape)}, the config implies {want}")
        if shard in self.loaded:
            raise MissingWeightError(f"weight {name!r} appears twice in the checkpoint")
        if self.partition is not None:
            tensor = self.partition.select(tensor, shard)
        self.loaded.add(shard)
        if isinstance(tensor, QuantizedTensor):
            self.quantized[shard] = tensor
            return
        tensor = tensor.to(device=self.device, dtype=self.dtype)
        if shard is None:  # a whole weight: adopt it, no copy
            self.data = tensor.contiguous()
        else:
            if self.data is None:
                self.data = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self.data[start: start + rows].copy_(tensor)

    @property
    def is_quantized(self) -> bool:
        """Every part of the weight is in a block format our kernels run (models/layers/quantized.py)."""
        return bool(self.quantized) and len(self.quantized) == len(self.shards) and all(
            kernel_runs(q.ggml_type, q.in_features) for q in self.quantized.values())

    def quantized_shards(self) -> list[tuple[QuantizedTensor, int]]:
        """(blocks, first row) of each part, in row order."""
        return [(self.quantized[name], start) for name, (start, _) in self.shards.items()]

    def quantize(self, ggml_type: int) -> None:
        """Replace the dense weight by ggml_type blocks (HF checkpoints under --quantization); a weight
        whose rows are not whole blocks stays dense."""
        if self.data is None or not kernel_runs(ggml_type, self.shape[-1]):
            return
        from pyserve.models.layers.quantized import quantize

        self.shards = {None: (0, self.shape[0])}
        self.quantized = {None: quantize(self.data, ggml_type)}
        self.data = None

    def densify(self) -> None:
        """Dequantize any parts kept in a block format (types without a kernel, or a weight mixing
        dense and quantized parts), so the dense path runs the whole weight."""
        for name, q in self.quantized.items():
            tensor = q.dequantize().to(device=self.device, dtype=self.dtype)
            if name is None:
                self.data = tensor
            else:
                if self.data is None:
                    self.data = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                start, rows = self.shards[name]
                self.data[start: start + rows].copy_(tensor)
        self.quantized = {}

    @property
    def complete(self) -> bool:
        return self.loaded == set(self.shards)

    def missing(self) -> list[str | None]:
        return [s for s in self.shards if s not in self.loaded]
