"""Model architectures and the entry point that loads one from disk."""

from __future__ import annotations

from pathlib import Path

import torch

from pyserve.config import ModelConfig
from pyserve.models.llama import AttentionMetadata, LlamaModel

__all__ = ["AttentionMetadata", "LlamaModel", "ModelConfig", "load_model", "resolve_dtype"]


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is float32 on the CPU (bf16 matmuls are slow there) and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
    return names[dtype]


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
               max_positions: int | None = None) -> LlamaModel:
    """An HF folder (config.json + safetensors)."""
    from pyserve.loader.hf import load_hf_config, load_hf_weights

    device = torch.device(device)
    folder = Path(path)
    cfg = load_hf_config(folder)
    weights = load_hf_weights(folder)
    return LlamaModel(cfg, weights, device, resolve_dtype(dtype, device), max_positions)
