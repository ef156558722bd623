"""Collectives through shared memory, for ranks on one host started by pyserve itself.

On the 2-core development machine gloo takes ~1.6 ms for an all-reduce of one decode row (576 floats)
and as long for a small broadcast, where the TCP round trip under it is ~20 µs: a 30-layer model makes
61 all-reduces per step, which would cost ~100 ms a step. Here each rank copies its tensor into its own
slot of a shared buffer and publishes a counter; every rank then sums the slots in rank order (so every
rank gets the same bits) into its output. Slots are double-buffered by the counter's parity: a rank
writing step e's slot has seen every rank publish step e-1, so each has finished reading step e-2's.

The buffer is a memfd (an anonymous file passed to the workers as a file descriptor): it has no name,
so nothing is left in /dev/shm whichever process dies, however. Each counter is an int64 written by one
rank and read by the others: an aligned 8-byte store is atomic, and x86's store order (TSO) makes a
rank's slot data visible to another core before the counter it stores afterwards. (A CPU with a weaker
memory order would need a fence between the two.)

Waiting spins briefly, then yields the core (more ranks than cores: TP=3 on 2 cores), then sleeps: a rank
waiting for rank 0's next message sleeps in select() on its own eventfd, which rank 0 writes after each
message (an idle server's ranks cost ~0.6% of a core instead of ~3.7% polling), other waits nap. A
wait gives up with PeerFailure after `timeout` seconds (a rank that hangs), or at once when a rank sets
the shared abort flag (the supervisor saw a rank die).
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import time

import numpy as np
import torch

SLOT_BYTES = 8 << 20  # per rank and parity; larger tensors go in pieces
MESSAGE_BYTES = 16 << 20  # rank 0's step messages (token ids, block tables...)
_HEADER = 4096  # counters: [0] abort, [1] message seq, [2] message length, [8 + r] rank r's collective
#                 epoch, [8 + 64 + r] rank r's last message read
_MAX_RANKS = 64
_SPINS = 200  # checks before the first yield (~0.1 ms)
_YIELD_SECONDS = 0.005
_NAP_SECONDS, _IDLE_SECONDS, _IDLE_NAP_SECONDS = 0.0002, 0.1, 0.001
_WAKE_CHECK_SECONDS = 0.1  # a rank sleeping on its eventfd still checks the abort flag this often


class PeerFailure(RuntimeError):
    """Another rank died or stopped answering."""


def buffer_bytes(world_size: int) -> int:
    return _HEADER + MESSAGE_BYTES + 2 * world_size * SLOT_BYTES


def create_wake_fds(world_size: int) -> list[int]:
    """One inheritable, non-blocking eventfd per rank > 0."""
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(world_size - 1)]
    for fd in fds:
        os.set_inheritable(fd, True)
    return fds


def create_memfd(world_size: int) -> int:
    """A zero-filled anonymous shared file of the size `world_size` ranks need (inheritable fd)."""
    fd = os.memfd_create("pyserve-tp", 0)
    os.ftruncate(fd, buffer_bytes(world_size))
    os.set_inheritable(fd, True)
    return fd


class ShmCommunicator:
    def __init__(self, fd: int, rank: int, world_size: int, timeout: float, wake_fds: list[int] | None = None):
        """wake_fds: one eventfd per rank > 0 (index rank - 1), which rank 0 writes after each message, so
        that a rank idle between requests sleeps in select() instead of polling (None: it polls)."""
        if world_size > _MAX_RANKS:
            raise ValueError(f"at most {_MAX_RANKS} ranks share memory")
        self.rank, self.size, self.timeout = rank, world_size, timeout
        self._map = mmap.mmap(fd, buffer_bytes(world_size))
        self._counters = np.frombuffer(self._map, dtype=np.int64, count=_HEADER // 8)
        self._message = np.frombuffer(self._map, dtype=np.uint8, count=MESSAGE_BYTES, offset=_HEADER)
        slots = torch.frombuffer(self._map, dtype=torch.uint8, offset=_HEADER + MESSAGE_BYTES,
                                 count=2 * world_size * SLOT_BYTES)
        self._slots = slots.view(2, world_size, SLOT_BYTES)
        self._epoch = 0
        self._messages_read = 0
        self._wake_fds = wake_fds
        self._abort_reason: str | None = None  # in the process that aborted: why

    # ---- waiting ------------------------------------------------------------------------------

    def _wait(self, ready, what: str, timeout: float | None, wake_fd: int | None = None) -> None:
        """Until ready(): spin (a partner a few µs behind), then yield the core between checks for the
        first few ms (more ranks than cores: the partner may need this one), then sleep: until wake_fd is
        written where there is one (rank 0's next message), else 0.2 ms at a time, 1 ms once idle."""
        for _ in range(_SPINS):
            if ready():
                return
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        checks = 0
        while not ready():
            checks += 1
            now = time.monotonic()
            if self._counters[0]:
                raise PeerFailure(self._abort_reason or
                                  f"rank {self.rank}: a rank of the tensor-parallel group failed ({what})")
            if deadline is not None and now > deadline:
                raise PeerFailure(f"rank {self.rank}: no answer from the other ranks in {timeout:.0f} s ({what}); "
                                  f"a rank has hung")
            waited = now - start
            if waited < _YIELD_SECONDS:
                os.sched_yield()
            elif wake_fd is not None:
                if select.select([wake_fd], [], [], _WAKE_CHECK_SECONDS)[0]:
                    try:
                        os.eventfd_read(wake_fd)  # consumed: the next wait sleeps until the next write
                    except BlockingIOError:
                        pass
            else:
                time.sleep(_NAP_SECONDS if waited < _IDLE_SECONDS else _IDLE_NAP_SECONDS)

    def abort(self, reason: str | None = None) -> None:
        """Make every rank's wait fail (the supervisor saw a rank die); this rank's says `reason`."""
        self._abort_reason = reason
        self._counters[0] = 1

    # ---- collectives -------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x (CPU, contiguous) summed over ranks, in place; every rank gets the same bits."""
        flat = x.view(-1)
        per = SLOT_BYTES // x.element_size()
        for start in range(0, flat.numel(), per):
            self._all_reduce_piece(flat[start: start + per])
        return x

    def _publish(self, piece: torch.Tensor) -> torch.Tensor:
        """Write piece into this rank's slot and wait for every rank's; the slots as [ranks, n] views."""
        self._epoch += 1
        nbytes = piece.numel() * piece.element_size()
        slots = self._slots[self._epoch & 1]
        slots[self.rank, :nbytes].copy_(piece.view(torch.uint8))
        counters, base, epoch = self._counters, 8, self._epoch
        counters[base + self.rank] = epoch
        others = [base + r for r in range(self.size) if r != self.rank]
        if len(others) == 1:
            (other,) = others
            self._wait(lambda: counters[other] >= epoch, "all-reduce", self.timeout)
        else:
            self._wait(lambda: all(counters[i] >= epoch for i in others), "all-reduce", self.timeout)
        return slots[:, :nbytes].view(piece.dtype)

    def _all_reduce_piece(self, piece: torch.Tensor) -> None:
        views = self._publish(piece)
        piece.copy_(views[0])
        for r in range(1, self.size):
            piece.add_(views[r])

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's x (same shape on all) on rank 0, in rank order; None elsewhere."""
        flat = x.contiguous().view(-1)
        per = SLOT_BYTES // x.element_size()
        out = torch.empty(self.size, flat.numel(), dtype=x.dtype) if self.rank == 0 else None
        for start in range(0, max(1, flat.numel()), per):
            piece = flat[start: start + per]
            views = self._publish(piece)
            if out is not None:
                out[:, start: start + piece.numel()].copy_(views)
        return None if out is None else list(out.view(self.size, *x.shape).unbind(0))

    # ---- rank 0's messages -------------------------------------------------------------------

    def send(self, obj) -> None:
        """Rank 0: publish obj (pickled) to every other rank, once they have read the last one."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MESSAGE_BYTES:
            raise ValueError(f"a tensor-parallel step message of {len(data)} bytes (at most {MESSAGE_BYTES})")
        counters, seq = self._counters, int(self._counters[1])
        readers = [8 + _MAX_RANKS + r for r in range(1, self.size)]
        self._wait(lambda: all(counters[i] >= seq for i in readers), "message read", self.timeout)
        self._message[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        counters[2] = len(data)
        counters[1] = seq + 1
        for wake_fd in self._wake_fds or ():
            os.eventfd_write(wake_fd, 1)

    def receive(self):
        """Ranks > 0: the next message from rank 0 (waits as long as rank 0 is idle)."""
        counters, want = self._counters, self._messages_read + 1
        wake_fd = self._wake_fds[self.rank - 1] if self._wake_fds else None
        self._wait(lambda: counters[1] >= want, "waiting for rank 0", None, wake_fd)
        obj = pickle.loads(self._message[: int(counters[2])].tobytes())
        self._messages_read = want
        counters[8 + _MAX_RANKS + self.rank] = want
        return obj

    def close(self) -> None:
        self._slots = self._counters = self._message = None
        try:
            self._map.close()
        except BufferError:  # a tensor view is still alive somewhere; the mapping goes with the process
            pass
