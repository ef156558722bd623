"""Phi-3 / Phi-3.5: the Llama layer (pre-norms, SiLU MLP, no biases), with a sliding window on every
layer and longrope scaling (both in the config and the rotary embedding). Its checkpoints store
q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`, in our fused layers' row order, so
nothing is packed: each fills its layer whole."""

from __future__ import annotations

from pyserve.models.llama import LlamaModel


class Phi3Model(LlamaModel):
    packed_modules: dict[str, tuple[str, str]] = {}
