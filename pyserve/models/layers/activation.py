"""Gated activations of the MLP: [tokens, 2 * d] = [gate | up] -> act(gate) * up, by the names
HF configs give them (`hidden_act` / `hidden_activation`)."""

from __future__ import annotations

from pyserve import _ops

ACTIVATIONS = {
    "silu": _ops.silu_and_mul,
    "gelu_pytorch_tanh": _ops.gelu_tanh_and_mul,
    "gelu_tanh": _ops.gelu_tanh_and_mul,
}
