"""A rank other than 0: load this rank's shard of the model, then follow rank 0's steps (executor.py).

Started by pyserve's launcher (`python -m pyserve.distributed.worker`, the engine's settings in
PYSERVE_TP_WORKER) or by torchrun running `pyserve` itself (cli.py calls `run_rank`). It exits 0 when
rank 0 says stop, and 1, at once, when the group fails (a rank gone or hung): rank 0 reports that.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from pyserve.distributed.launch import WORKER_SPEC, rank_device, threads_per_rank


def run_rank(model, config) -> int:
    import torch

    from pyserve.distributed.executor import follow
    from pyserve.distributed.group import TensorParallelGroup, rank_from_env, shm_fd_from_env, wake_fds_from_env
    from pyserve.distributed.state import set_tensor_parallel
    from pyserve.models import load_model

    rank, size = rank_from_env()
    log = logging.getLogger("pyserve.distributed")
    torch.set_num_threads(threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    group = None
    try:
        group = TensorParallelGroup(rank, size, rank_device(config.device), config.distributed_timeout,
                                    shm_fd_from_env(), wake_fds=wake_fds_from_env())
        set_tensor_parallel(group)
        t = time.perf_counter()
        shard = load_model(model, device=group.device, dtype=config.dtype, max_positions=config.max_model_len,
                           quantization=config.quantization)
        report = {"weights": time.perf_counter() - t}
        log.info("rank %d/%d: shard loaded in %.2f s", rank, size, report["weights"])
        group.barrier()  # rank 0 waits here for every rank's weights
        follow(shard, group, report)
    except BaseException as e:  # noqa: BLE001 - the group has failed: say why, go
        log.error("rank %d: %s: %s", rank, type(e).__name__, e)
        sys.stderr.flush()
        os._exit(1)
    group.close()
    return 0


def main() -> int:
    from pyserve.config import EngineConfig

    logging.basicConfig(level=os.environ.get("PYSERVE_LOG_LEVEL", "info").upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank {os.environ.get('RANK')} %(name)s: %(message)s")
    spec = json.loads(os.environ[WORKER_SPEC])
    return run_rank(spec["model"], EngineConfig(**spec["config"]))


if __name__ == "__main__":
    sys.exit(main())
