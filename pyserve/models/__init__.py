"""Model architectures and the entry point that loads one from disk."""

from __future__ import annotations

from pathlib import Path

import torch

from pyserve.config import ModelConfig
from pyserve.models.base import CausalLM
from pyserve.models.layers.attention import AttentionMetadata
from pyserve.models.llama import LlamaModel
from pyserve.models.loading import load_weights
from pyserve.registry import model_class

__all__ = ["AttentionMetadata", "CausalLM", "LlamaModel", "ModelConfig", "load_model", "resolve_dtype"]


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


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
               max_positions: int | None = None, quantization: str | None = None) -> CausalLM:
    """An HF folder (config.json + safetensors) or a `.gguf` file; None is the
    embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF).

    quantization: None keeps a GGUF file's block formats where our CPU kernels run them (dequantized
    on CUDA) and an HF checkpoint dense; "none" dequantizes a GGUF file too; "q8_0" / "q4_0" quantize
    an HF checkpoint's linear weights at load (CPU)."""
    from pyserve.loader.hf import ModelLoadError, load_hf_config, load_hf_weights
    from pyserve.models.layers.quantized import QUANTIZATIONS

    device = torch.device(device)
    if quantization not in (None, "none", *QUANTIZATIONS):
        raise ValueError(f"quantization must be none, {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization in QUANTIZATIONS and device.type != "cpu":
        raise ModelLoadError(f"--quantization {quantization}: the quantized kernels run on the CPU only")
    if path is None:
        from pyserve.loader import default_gguf_path

        path = default_gguf_path()
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from pyserve.loader import load_tensors, read_gguf
        from pyserve.loader.gguf_model import gguf_model_config, gguf_to_hf_weights

        if quantization in QUANTIZATIONS:
            raise ModelLoadError(f"--quantization {quantization} applies to HF checkpoints; {path.name} keeps "
                                 f"its own block formats (--quantization none dequantizes it)")
        with read_gguf(path) as gguf:
            cfg = gguf_model_config(gguf)
            keep = device.type == "cpu" and quantization != "none"
            weights = gguf_to_hf_weights(load_tensors(gguf, keep_quantized=keep), cfg, str(path))
    elif path.is_dir():
        cfg = load_hf_config(path)
        weights = load_hf_weights(path)
    elif not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    else:
        raise ModelLoadError(f"{path}: not a model (want an HF folder or a .gguf file)")
    model = model_class(cfg.architecture)(cfg, device, resolve_dtype(dtype, device), max_positions)
    model.quantize_to = QUANTIZATIONS.get(quantization)
    load_weights(model, weights)
    return model
