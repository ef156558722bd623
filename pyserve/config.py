"""Configuration dataclasses: the model's architecture (from an HF config.json
or GGUF metadata) and, later, the engine's cache and scheduling limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    # "default" or "llama3" (Llama 3.1's frequency-dependent scaling).
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama when attention_bias
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> "ModelConfig":
        """From a config.json dict (transformers 4.x `rope_theta`/`rope_scaling`
        or 5.x `rope_parameters`)."""
        arch = cfg.get("model_type", "")
        if arch not in SUPPORTED_ARCHITECTURES:
            names = cfg.get("architectures") or [arch or "<missing model_type>"]
            raise UnsupportedModelError(
                f"unsupported architecture {names[0]!r} (model_type {arch!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {cfg['hidden_act']!r} (only 'silu')")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope_params = dict(cfg.get("rope_parameters") or {})
        scaling = dict(cfg.get("rope_scaling") or {})
        rope_params = {**scaling, **rope_params}
        theta = float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default")) or "default"
        if rope_type not in ("default", "llama3"):
            raise UnsupportedModelError(f"unsupported rope scaling type {rope_type!r} (supported: default, llama3)")
        rope = RopeConfig(
            theta=theta,
            type=rope_type,
            factor=float(rope_params.get("factor", 1.0)),
            low_freq_factor=float(rope_params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope_params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope_params.get("original_max_position_embeddings", 8192)),
        )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None
        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            sliding_window=int(sliding) if sliding else None,
        )
