"""Gated activations of the MLP: [tokens, 2 * d] = [gate | up] -> act(gate) * up, by the names
HF configs give them (`hidden_act` / `hidden_activation`)."""

from __future__ import annotations

import torch

from pyserve import _ops

ACTIVATIONS = {
    "silu": _ops.silu_and_mul,
    "gelu_pytorch_tanh": _ops.gelu_tanh_and_mul,
    "gelu_tanh": _ops.gelu_tanh_and_mul,
}


# The gated MLP's intermediate [rows, 2 * d] on the CPU is taken this many bytes at a time. A prefill of
# ~1900 tokens through a 1B model's MLP (d = 8192) made a 124 MB gate/up output and a 62 MB activation
# per layer: past glibc's largest mmap threshold (32 MB), so each was a fresh mapping whose ~45k pages
# faulted in and were zeroed, then unmapped -- 700k page faults and ~2 s of kernel time per such prefill
# on the development machine. Chunks of this size come back from the heap, already mapped. Each chunk
# re-reads the MLP's weights (a 1B model's 0.2% extra bytes per row); rows stay independent (the kernels
# are batch-invariant), so the result is the same bits.
MLP_CHUNK_BYTES = 16 << 20


def gated_mlp(x: torch.Tensor, gate_up, act_and_mul, down) -> torch.Tensor:
    """down(act_and_mul(gate_up(x))) for x [tokens, hidden]; on the CPU in row chunks whose gate/up output
    is at most MLP_CHUNK_BYTES (CUDA's caching allocator has no such cost)."""
    rows = x.shape[0]
    if x.device.type != "cpu" or rows <= 1:
        return down(act_and_mul(gate_up(x)))
    chunk = max(1, MLP_CHUNK_BYTES // (gate_up.out_features * x.element_size()))
    if rows <= chunk:
        return down(act_and_mul(gate_up(x)))
    out = None
    for start in range(0, rows, chunk):
        y = down(act_and_mul(gate_up(x[start: start + chunk])))
        if out is None:
            out = torch.empty(rows, y.shape[1], dtype=y.dtype)
        out[start: start + chunk] = y
    return out
