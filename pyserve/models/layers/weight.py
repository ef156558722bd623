"""A tensor of a layer that a checkpoint fills: whole, or as named row ranges (shards) when the layer
fuses several checkpoint tensors (q/k/v into one projection, gate/up into one)."""

from __future__ import annotations

import torch

from pyserve.loader.hf import ModelLoadError


class MissingWeightError(ModelLoadError):
    """A weight the architecture needs is absent or has the wrong shape."""


class Weight:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 shards: dict[str, int] | None = None):
        """shards: name -> rows, in order (they must add up to shape[0]); None: filled whole."""
        self.shape = tuple(shape)
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
        if tuple(tensor.shape) != want:
            raise MissingWeightError(f"weight {name!r} has shape {tuple(tensor.shape)}, the config implies {want}")
        if shard in self.loaded:
            raise MissingWeightError(f"weight {name!r} appears twice in the checkpoint")
        tensor = tensor.to(device=self.device, dtype=self.dtype)
        if shard is None:  # a whole weight: adopt it, no copy
            self.data = tensor.contiguous()
        else:
            if self.data is None:
                self.data = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self.data[start: start + rows].copy_(tensor)
        self.loaded.add(shard)

    @property
    def complete(self) -> bool:
        return self.loaded == set(self.shards)

    def missing(self) -> list[str | None]:
        return [s for s in self.shards if s not in self.loaded]
