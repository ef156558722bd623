"""Run a function on every rank of a real tensor-parallel group (separate processes, shared memory or
gloo), for tests that look inside the model: `run_ranks(3, "tests.distributed.checks:some_check", ...)`
returns each rank's return value, in rank order.

    python -m tests.distributed.ranks MODULE:FUNCTION OUT_DIR ARGS_JSON   (as one rank; env gives which)
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_ranks(size: int, target: str, *args, transport: str = "shm", timeout: float = 300) -> list:
    from pyserve.distributed.shm import create_memfd

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fd = create_memfd(size) if transport == "shm" else None
    with tempfile.TemporaryDirectory() as out:
        procs = []
        for rank in range(size):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "PYTHONPATH": str(ROOT)}
            if fd is not None:
                env["PYSERVE_TP_SHM_FD"] = str(fd)
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed.ranks", target, out,
                                           json.dumps(args)], env=env, cwd=ROOT,
                                          pass_fds=() if fd is None else (fd,)))
        try:
            codes = [p.wait(timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            if fd is not None:
                os.close(fd)
        assert codes == [0] * size, f"ranks exited with {codes}"
        return [pickle.loads((Path(out) / f"{r}.pkl").read_bytes()) for r in range(size)]


def main() -> None:
    target, out, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    import torch

    from pyserve.distributed.group import TensorParallelGroup, shm_fd_from_env

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    group = TensorParallelGroup(rank, size, torch.device("cpu"), timeout=60.0, shm_fd=shm_fd_from_env())
    module, name = target.split(":")
    result = getattr(importlib.import_module(module), name)(group, *args)
    (Path(out) / f"{rank}.pkl").write_bytes(pickle.dumps(result))
    group.close()


if __name__ == "__main__":
    main()
