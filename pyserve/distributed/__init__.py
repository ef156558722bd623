"""Tensor parallelism over torch.distributed (and shared memory on one host): the group (group.py), how
ranks start (launch.py, worker.py) and follow rank 0's steps (executor.py); the layers' side is
models/layers/parallel.py."""
