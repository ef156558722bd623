"""Running one model step on every rank: rank 0 drives, the other ranks follow.

Rank 0 owns the scheduler, the sampler and the HTTP server; its engine holds a ShardedModel, which has
the model's interface and sends each call that runs the model (a forward, a KV-cache allocation, a block
copy, the matmul warm-up) to every other rank as one message before running its own shard. The other
ranks run `follow`: receive, run the same call on their shard and their own KV cache, repeat. The
collectives inside the forward (layers/parallel.py) keep the ranks in step; only rank 0 gets logits.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("pyserve.distributed")


def _to(device: torch.device, value):
    """Message values onto this rank's device (messages travel as CPU tensors)."""
    if device.type == "cpu":
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(device, v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return type(value)(**{k: _to(device, getattr(value, k)) for k in value.__dataclass_fields__})
    return value


class ShardedModel:
    """Rank 0's view of a model split over a tensor-parallel group (anything not listed here is the
    local shard's: cfg, device, dtype, num_kv_heads...)."""

    def __init__(self, model, group):
        self.model, self.group = model, group
        self.phase_seconds: dict[str, float] = {}

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def _send(self, op: str, *args) -> None:
        self.group.send((op, _to(torch.device("cpu"), args)))

    def forward(self, input_ids, positions, kv_caches, meta, logits_indices):
        self._send("forward", input_ids, positions, meta, logits_indices)
        return self.model.forward(input_ids, positions, kv_caches, meta, logits_indices)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        self._send("allocate_kv_cache", num_blocks, block_size, dtype)
        return self.model.allocate_kv_cache(num_blocks, block_size, dtype)

    def copy_blocks(self, kv_caches, mapping: torch.Tensor) -> None:
        self._send("copy_blocks", mapping)
        self.model.copy_blocks(kv_caches, mapping)

    def warm_up_matmuls(self, max_tokens: int, max_logit_rows: int) -> None:
        self._send("warm_up_matmuls", max_tokens, max_logit_rows)
        t = time.perf_counter()
        self.model.warm_up_matmuls(max_tokens, max_logit_rows)
        self.phase_seconds["warmup_matmuls"] = time.perf_counter() - t

    def rank_reports(self, rank0: dict) -> list[dict]:
        """Every rank's startup report (rank 0's is given), in rank order."""
        self._send("report")
        return self.group.gather_objects(rank0)

    def ping(self) -> None:
        """Nothing to run: a send that fails if a rank's connection has closed (torch.distributed)."""
        self._send("ping")

    def stop(self) -> None:
        self._send("stop")


def follow(model, group, report: dict) -> None:
    """Ranks > 0: run rank 0's calls on this rank's shard until it says stop. report: this rank's
    startup figures (phase seconds), sent when rank 0 asks."""
    device = model.device
    kv_caches = None
    while True:
        op, args = group.receive()
        args = _to(device, args)
        if op == "forward":
            input_ids, positions, meta, rows = args
            model.forward(input_ids, positions, kv_caches, meta, rows)
        elif op == "allocate_kv_cache":
            kv_caches = None  # the profile's cache goes before the real one is made
            kv_caches = model.allocate_kv_cache(*args)
        elif op == "copy_blocks":
            model.copy_blocks(kv_caches, args[0])
        elif op == "warm_up_matmuls":
            t = time.perf_counter()
            model.warm_up_matmuls(*args)
            report["warmup_matmuls"] = time.perf_counter() - t
        elif op == "report":
            group.gather_objects(report)
        elif op == "ping":
            pass
        elif op == "stop":
            log.info("rank %d: stopping", group.rank)
            return
        else:
            raise RuntimeError(f"rank {group.rank}: unknown message {op!r} from rank 0")
