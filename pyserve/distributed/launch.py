"""Starting the ranks of a tensor-parallel group.

On one host `pyserve --tensor-parallel-size N` is rank 0 and starts ranks 1..N-1 itself as child
processes (`python -m pyserve.distributed.worker`), sharing memory with them for the collectives
(shm.py), and supervises them: a rank that exits fails the group (every rank's wait is aborted) and the
engine reports it. Children die with the thread that started them (PR_SET_PDEATHSIG), so a rank 0
killed outright leaves no orphans; they run in their own session, so a Ctrl-C in the terminal reaches
rank 0 alone, which drains and then stops them.

Across hosts the ranks are started by torchrun, which sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
`pyserve` then runs as that rank (cli.py) and the group talks through torch.distributed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import torch

from pyserve.distributed.group import SHM_FD, WAKE_FDS, TensorParallelGroup, rank_from_env
from pyserve.distributed.shm import PeerFailure, create_memfd, create_wake_fds

log = logging.getLogger("pyserve.distributed")
WORKER_SPEC = "PYSERVE_TP_WORKER"  # JSON: the model path and the EngineConfig, for a rank pyserve starts
_PR_SET_PDEATHSIG = 1


def threads_per_rank(local_ranks: int) -> int:
    """The host's cores shared among the ranks on it (OMP_NUM_THREADS, when set, wins)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, len(os.sched_getaffinity(0)) // local_ranks)


def rank_device(device: str) -> torch.device:
    """cuda -> this rank's GPU on its host (LOCAL_RANK); cpu stays cpu."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRanks:
    """Ranks 1..N-1 as child processes of this one (rank 0), and their supervision."""

    def __init__(self, size: int, model, config):
        self.size = size
        self.failure: str | None = None
        self.on_failure = None  # called with why (from the supervisor thread) when a rank exits unasked
        self._stopping = False
        port = _free_port()
        base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(size),
                "LOCAL_WORLD_SIZE": str(size)}
        self.shm_fd = create_memfd(size) if torch.device(config.device).type == "cpu" else None
        self.wake_fds = create_wake_fds(size) if self.shm_fd is not None else None
        spec = json.dumps({"model": None if model is None else str(model), "config": dataclasses.asdict(config)})
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, size):
            env = {**os.environ, **base, "RANK": str(rank), "LOCAL_RANK": str(rank), WORKER_SPEC: spec}
            if self.shm_fd is not None:
                env[SHM_FD] = str(self.shm_fd)
                env[WAKE_FDS] = ",".join(map(str, self.wake_fds))
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "pyserve.distributed.worker"], env=env,
                pass_fds=() if self.shm_fd is None else (self.shm_fd, *self.wake_fds), start_new_session=True,
                preexec_fn=_die_with_parent))
        self.init_method = f"tcp://127.0.0.1:{port}"
        self._watch = threading.Thread(target=self._supervise, name="pyserve-tp-supervisor", daemon=True)
        self._watch.start()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _supervise(self) -> None:
        while not self._stopping:
            for rank, p in enumerate(self.procs, start=1):
                code = p.poll()
                if code is not None and not self._stopping:
                    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                    self.failure = f"tensor-parallel rank {rank} (pid {p.pid}) exited ({how})"
                    log.error("%s; the group cannot run without it", self.failure)
                    if self.on_failure is not None:
                        self.on_failure(self.failure)
                    return
            time.sleep(0.1)

    def check(self) -> None:
        if self.failure is not None:
            raise PeerFailure(self.failure)

    def stop(self, timeout: float = 10.0) -> None:
        """After rank 0 has told them to stop: wait for them, then kill what remains."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        self._stopping = True
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for fd in ([self.shm_fd] if self.shm_fd is not None else []) + (self.wake_fds or []):
            try:
                os.close(fd)
            except OSError:
                pass
        self.shm_fd = self.wake_fds = None


def _join(ranks: LocalRanks | None, make_group):
    """make_group() (joining waits for every rank), except that a rank pyserve started which exits first
    fails it at once, with why, instead of after the rendezvous timeout."""
    if ranks is None:
        return make_group()
    box: dict = {}

    def join() -> None:
        try:
            box["group"] = make_group()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=join, name="pyserve-tp-join", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.1)
        if ranks.failure is not None and t.is_alive():  # the thread stays blocked; the process is failing
            raise PeerFailure(f"{ranks.failure} before joining the group")
    if "error" in box:
        raise box["error"]
    return box["group"]


def start_rank0(model, config) -> tuple[TensorParallelGroup, LocalRanks | None]:
    """This process as rank 0 of a group of config.tensor_parallel_size: started by torchrun (the other
    ranks are its), or else starting the other ranks here."""
    size = config.tensor_parallel_size
    env = rank_from_env()
    ranks = None
    if env is None:
        dev = torch.device(config.device)
        if dev.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"--tensor-parallel-size {size} on one host needs {size} GPUs (one per rank); torch "
                             f"sees {torch.cuda.device_count()}")
        ranks = LocalRanks(size, model, config)
        local = size
    else:
        rank, world = env
        if world != size:
            raise ValueError(f"--tensor-parallel-size {size}, but this process was started as one of {world} "
                             f"ranks (WORLD_SIZE)")
        if rank != 0:
            raise ValueError(f"rank {rank} cannot run the engine (only rank 0 does)")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads_per_rank(local))
    try:
        group = _join(ranks, lambda: TensorParallelGroup(
            0, size, rank_device(config.device), config.distributed_timeout,
            ranks.shm_fd if ranks is not None else None, init_method=ranks.init_method if ranks is not None else None,
            wake_fds=ranks.wake_fds if ranks is not None else None))
    except BaseException:
        if ranks is not None:
            ranks.kill()
        raise
    if ranks is not None:
        ranks.on_failure = group.abort
    log.info("tensor parallelism: %d ranks (%s), %d threads each", size, group.transport, torch.get_num_threads())
    return group, ranks
