"""What one tensor-parallel collective costs on this host: shared memory (pyserve's transport for the ranks it
starts itself) against gloo (torch.distributed's CPU backend, what torchrun-started ranks use), for the
all-reduces a step makes (one decode row, a decode batch, a prefill chunk), the logits gather, and rank 0's
step message.

    python bench/tp_collectives.py [--ranks 2] [--iters 300] [--json out.json]

Each rank is a process with 1 torch thread; medians over --iters calls, after 20 warm-up calls, timed on
rank 0. Between calls each rank does nothing else, so the figures are the transport's own latency (in a
real step the ranks also wait for each other's compute).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"all_reduce 1x576 (decode row)": (1, 576), "all_reduce 8x2048 (decode batch, 1B)": (8, 2048),
          "all_reduce 512x2048 (prefill chunk, 1B)": (512, 2048)}


def rank_main(transport: str, iters: int, out: str) -> None:
    import torch

    from pyserve.distributed.group import TensorParallelGroup, shm_fd_from_env

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    group = TensorParallelGroup(rank, size, torch.device("cpu"), timeout=60.0,
                                shm_fd=shm_fd_from_env() if transport == "shm" else None)
    results = {}

    def timed(name, fn):
        for _ in range(20):
            fn()
        samples = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
        results[name] = statistics.median(samples) * 1e6

    for name, shape in SHAPES.items():
        x = torch.ones(shape)
        timed(name, lambda x=x: group.all_reduce(x))
    logits = torch.ones(8, 128256 // size)
    timed(f"gather_to_first 8x{128256 // size} (logits)", lambda: group.gather_to_first(logits))
    message = ("forward", torch.arange(64), torch.arange(64), torch.zeros(8, 32, dtype=torch.int32))
    # gloo's broadcast returns once sent: a barrier after each keeps rank 0 from running ahead (shared
    # memory's send already waits for the last message to be read).
    import torch.distributed as dist

    if rank == 0:
        timed("step message (send)", lambda: (group.send(message), dist.barrier() if transport == "gloo" else None))
    else:
        for _ in range(20 + iters):
            group.receive()
            if transport == "gloo":
                dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    group.close()


def run(transport: str, ranks: int, iters: int) -> dict:
    from pyserve.distributed.shm import create_memfd

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fd = create_memfd(ranks) if transport == "shm" else None
    out = f"/tmp/tp_collectives_{os.getpid()}_{transport}.json"
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        if fd is not None:
            env["PYSERVE_TP_SHM_FD"] = str(fd)
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-of", transport, "--iters", str(iters),
                                       "--out", out], env=env, pass_fds=() if fd is None else (fd,)))
    codes = [p.wait() for p in procs]
    if fd is not None:
        os.close(fd)
    if codes != [0] * ranks:
        raise SystemExit(f"{transport}: ranks exited with {codes}")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rank-of", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_of:
        rank_main(args.rank_of, args.iters, args.out)
        return
    results = {t: run(t, args.ranks, args.iters) for t in ("shm", "gloo")}
    print(f"{args.ranks} ranks, medians of {args.iters} calls (µs):")
    print(f"{'':44s} {'shm':>9s} {'gloo':>9s}")
    for name in results["shm"]:
        print(f"{name:44s} {results['shm'][name]:9.1f} {results['gloo'][name]:9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ranks": args.ranks, "iters": args.iters, "us": results}, indent=1))


if __name__ == "__main__":
    main()
