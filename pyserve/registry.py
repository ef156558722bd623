"""The architectures pyserve runs: HF and GGUF names -> one model class each.

Kept free of model imports (config and loaders read it; the model module is imported only when a
model is built), so adding an architecture that needs no new kernel is its model file, one entry
here and its tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str  # ModelConfig.architecture; also the HF `model_type`
    hf_classes: tuple[str, ...]  # config.json "architectures" entries
    gguf_name: str | None  # GGUF general.architecture, when llama.cpp defines one
    # llama.cpp's converter interleaves the q/k rows of Llama-style checkpoints for its own rotary layout.
    gguf_permuted_qk: bool = False
    model: str = "pyserve.models.llama:LlamaModel"


ARCHITECTURES = (
    # Mistral GGUF files are written as "llama" by llama.cpp's converter.
    Architecture("llama", ("LlamaForCausalLM",), "llama", gguf_permuted_qk=True),
    Architecture("mistral", ("MistralForCausalLM",), None),
    Architecture("qwen2", ("Qwen2ForCausalLM",), "qwen2"),
    Architecture("qwen3", ("Qwen3ForCausalLM",), "qwen3"),
    Architecture("olmo2", ("Olmo2ForCausalLM",), "olmo2", model="pyserve.models.olmo2:Olmo2Model"),
    Architecture("gemma2", ("Gemma2ForCausalLM",), "gemma2", model="pyserve.models.gemma:GemmaModel"),
    # Gemma 3's text-only checkpoints (1B); the multimodal ones are model_type "gemma3".
    Architecture("gemma3_text", ("Gemma3ForCausalLM",), "gemma3", model="pyserve.models.gemma:GemmaModel"),
    # llama.cpp writes Mixtral as "llama" with experts (llama.expert_count); loader/gguf_model.py reads
    # such a file as this architecture.
    Architecture("mixtral", ("MixtralForCausalLM",), None, gguf_permuted_qk=True,
                 model="pyserve.models.moe:MixtralModel"),
    Architecture("qwen3_moe", ("Qwen3MoeForCausalLM",), "qwen3moe", model="pyserve.models.moe:Qwen3MoeModel"),
    Architecture("phi3", ("Phi3ForCausalLM",), "phi3", model="pyserve.models.phi3:Phi3Model"),
)
_BY_NAME = {a.name: a for a in ARCHITECTURES}
_BY_GGUF = {a.gguf_name: a for a in ARCHITECTURES if a.gguf_name}


class UnsupportedModelError(ValueError):
    pass


def supported_names() -> str:
    return ", ".join(a.name for a in ARCHITECTURES)


def by_hf_config(cfg: dict) -> Architecture:
    model_type = cfg.get("model_type", "")
    arch = _BY_NAME.get(model_type)
    if arch is None:
        names = cfg.get("architectures") or [model_type or "<missing model_type>"]
        raise UnsupportedModelError(f"unsupported architecture {names[0]!r} (model_type {model_type!r}); "
                                    f"supported: {supported_names()}")
    return arch


def by_gguf_name(name: str | None, path: str) -> Architecture:
    arch = _BY_GGUF.get(name)
    if arch is None:
        raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {name!r}; "
                                    f"supported: {', '.join(_BY_GGUF)}")
    return arch


def by_name(name: str) -> Architecture:
    return _BY_NAME[name]


def model_class(name: str):
    module, cls = by_name(name).model.split(":")
    return getattr(importlib.import_module(module), cls)
