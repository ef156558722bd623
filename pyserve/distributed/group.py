"""A tensor-parallel group: which rank this process is, and the collectives the sharded layers call.

Two transports:
- shared memory (shm.py) when pyserve started every rank itself on one host: ~µs collectives;
- torch.distributed otherwise (ranks started by torchrun, possibly on several hosts): gloo on the CPU,
  NCCL for tensors on CUDA with gloo beside it for rank 0's step messages.

Either way rank 0 sends each step's inputs to the other ranks as one message (`send`/`receive`), and
every collective counts the time it takes (`collective_seconds`, reported by bench/tensor_parallel.py).
Collectives give up after `timeout` seconds, so a rank that hangs fails the group instead of hanging it;
a rank waiting for rank 0's next message waits as long as rank 0 is idle.
"""

from __future__ import annotations

import datetime
import os
import time

import torch

from pyserve.distributed.shm import PeerFailure, ShmCommunicator

# Environment of a rank: torchrun's names, which pyserve's own launcher sets too.
RANK, WORLD_SIZE, LOCAL_WORLD_SIZE = "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"
SHM_FD = "PYSERVE_TP_SHM_FD"  # set by pyserve's launcher: the shared buffer's file descriptor
WAKE_FDS = "PYSERVE_TP_WAKE_FDS"  # and the eventfds that wake idle ranks, comma-separated (shm.py)


class TensorParallelGroup:
    def __init__(self, rank: int, size: int, device: torch.device, timeout: float, shm_fd: int | None = None,
                 startup_timeout: float = 1800.0, init_method: str | None = None,
                 rendezvous_timeout: float = 300.0, wake_fds: list[int] | None = None):
        """init_method: where rank 0's store listens (tcp://host:port); None reads MASTER_ADDR/MASTER_PORT."""
        self.rank, self.size, self.device, self.timeout = rank, size, device, timeout
        self.collective_seconds = 0.0
        self.collective_calls = 0
        self._shm = None
        self._dist = None
        if shm_fd is not None and device.type == "cpu":
            self._shm = ShmCommunicator(shm_fd, rank, size, timeout, wake_fds)
        import torch.distributed as dist

        # Joining waits rendezvous_timeout for the other ranks' processes to start; the barrier after
        # loading waits startup_timeout for the slowest rank's weights. Collectives on `compute` fail after
        # `timeout`: a rank stuck mid-step.
        self.startup_timeout = startup_timeout
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=size, init_method=init_method or "env://",
                                    timeout=datetime.timedelta(seconds=rendezvous_timeout))
        self._dist = dist
        self.control = dist.group.WORLD
        if self._shm is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
            self.compute = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        self.transport = "shm" if self._shm is not None else ("nccl" if device.type == "cuda" else "gloo")

    # ---- the layers' collectives ------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over every rank, in place (every rank gets the same values)."""
        t = time.perf_counter()
        if self._shm is not None:
            self._shm.all_reduce(x)
        else:
            self._dist.all_reduce(x, group=self.compute)
        self._count(t)
        return x

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Each rank's x (same shape everywhere) on rank 0, in rank order; None on the others."""
        t = time.perf_counter()
        if self._shm is not None:
            out = self._shm.gather_to_first(x)
        else:
            x = x.contiguous()
            parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
            self._dist.gather(x, parts, dst=0, group=self.compute)
            out = parts
        self._count(t)
        return out

    def _count(self, start: float) -> None:
        self.collective_seconds += time.perf_counter() - start
        self.collective_calls += 1

    # ---- rank 0's messages, and startup ------------------------------------------------------------

    def send(self, message) -> None:
        """Rank 0: one message to every other rank (CPU tensors and plain values)."""
        if self._shm is not None:
            self._shm.send(message)
        else:
            self._dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self):
        """Ranks > 0: rank 0's next message."""
        if self._shm is not None:
            return self._shm.receive()
        box = [None]
        self._dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather_objects(self, obj) -> list | None:
        """Each rank's obj on rank 0 (startup reports); None elsewhere."""
        out = [None] * self.size if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def barrier(self) -> None:
        """Every rank here (after loading: as long as the slowest rank's weights take); rank 0's error
        names a rank that never came."""
        self._dist.monitored_barrier(group=self.control, timeout=datetime.timedelta(seconds=self.startup_timeout))

    def abort(self, reason: str | None = None) -> None:
        """Fail every rank's pending wait (shared memory: at once; torch.distributed: as peers close);
        this rank's fails with `reason`."""
        if self._shm is not None:
            self._shm.abort(reason)

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
        if self._dist is not None and self._dist.is_initialized():
            try:
                self._dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer already gone: nothing left to tidy
                pass


def rank_from_env() -> tuple[int, int] | None:
    """(rank, world size) when this process was started as a rank (by torchrun or pyserve), else None."""
    if WORLD_SIZE not in os.environ:
        return None
    return int(os.environ.get(RANK, "0")), int(os.environ[WORLD_SIZE])


def shm_fd_from_env() -> int | None:
    fd = os.environ.get(SHM_FD)
    return int(fd) if fd else None


def wake_fds_from_env() -> list[int] | None:
    fds = os.environ.get(WAKE_FDS)
    return [int(fd) for fd in fds.split(",")] if fds else None


__all__ = ["PeerFailure", "TensorParallelGroup", "rank_from_env", "shm_fd_from_env", "wake_fds_from_env"]
