"""The tensor-parallel group this process belongs to, as the model's layers see it while they are built.

Layers read it once, in their constructors (how much of each weight to hold, whether to sum their output
across ranks); the default is a single rank, where every collective is the identity. vLLM keeps the same
kind of process-wide "current group"; passing it through every model constructor would change every
architecture file for a value that is fixed for the life of the process.
"""

from __future__ import annotations

import contextlib

import torch


class SingleRank:
    """No parallelism: rank 0 of 1."""

    rank = 0
    size = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        return [x]


_current: object = SingleRank()


def tensor_parallel():
    """The group that layers built now shard across (SingleRank unless set)."""
    return _current


@contextlib.contextmanager
def using(group):
    """Build layers for `group` inside the block (tests build a sharded and a whole model in one process)."""
    global _current
    previous, _current = _current, group
    try:
        yield group
    finally:
        _current = previous


def set_tensor_parallel(group) -> None:
    global _current
    _current = group
