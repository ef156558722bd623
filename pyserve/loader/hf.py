"""Load a Hugging Face model folder: config.json, generation_config.json and
single or sharded safetensors, read through safetensors' memory map."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pyserve.config import ModelConfig
from pyserve.loader.progress import LoadProgress


class ModelLoadError(ValueError):
    """A one-line, user-facing reason why a model could not be loaded."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def load_hf_config(folder: Path) -> ModelConfig:
    cfg = ModelConfig.from_hf(read_json(folder / "config.json"))
    gen = folder / "generation_config.json"
    if gen.exists():
        eos = read_json(gen).get("eos_token_id")
        if eos is not None:
            eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
            cfg = ModelConfig(**{**cfg.__dict__, "eos_token_ids": eos_ids})
    return cfg


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no 'weight_map' object")
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"{missing[0]}: shard listed in {index.name} not found")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights found")
    return files


def load_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor by name. safe_open maps the file; each tensor is copied
    once out of the map (the mapping itself is only page cache)."""
    from safetensors import SafetensorError, safe_open

    weights: dict[str, torch.Tensor] = {}
    files = safetensors_files(folder)
    progress = LoadProgress(f"loading {folder.name}", len(files))
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    weights[name] = f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{path}: cannot read safetensors ({str(e).splitlines()[0]})") from None
        progress.update()
    progress.close()
    return weights
