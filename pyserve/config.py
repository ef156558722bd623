"""Configuration dataclasses: the model's architecture (from an HF config.json
or GGUF metadata) and, later, the engine's cache and scheduling limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyserve.registry import UnsupportedModelError, by_hf_config

# The MLP activations pyserve has kernels for (models/layers/activation.py maps them to ops).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_tanh")

__all__ = ["EngineConfig", "ModelConfig", "RopeConfig", "UnsupportedModelError"]


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    # One of ROPE_TYPES: "linear" divides every frequency by `factor`; "llama3" (Llama 3.1) divides
    # the low frequencies by it and interpolates a middle band; "yarn" interpolates between the two
    # by dimension and scales cos/sin by `attention_factor`; "longrope" (Phi-3) divides each frequency
    # by its entry of `short_factor` or `long_factor` and scales cos/sin by `attention_factor`.
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn: None derives it from factor (and mscale) as transformers does
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    # Divisors of each inverse frequency, as llama.cpp applies its `rope_freqs.weight` tensor: its
    # converter stores Llama 3's scaling there and nowhere in the metadata. Applied after `type`.
    freq_factors: tuple[float, ...] | None = None
    # longrope: per-frequency divisors for contexts up to original_max_position_embeddings and beyond.
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> "RopeConfig":
        """From transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`."""
        params = {**dict(cfg.get("rope_scaling") or {}), **dict(cfg.get("rope_parameters") or {})}
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        # Phi-3's config class renames its older "su" (and "yarn") scaling to longrope; "su" is longrope anywhere.
        if rope_type == "su" or (rope_type == "yarn" and cfg.get("model_type") == "phi3"):
            rope_type = "longrope"
        if rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope scaling type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
        if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
            raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
        if rope_type == "yarn" and params.get("extrapolation_factor", 1.0) != 1.0:
            raise UnsupportedModelError("yarn rope scaling with extrapolation_factor != 1 is not supported")

        def opt(key: str) -> float | None:
            return None if params.get(key) is None else float(params[key])

        factor = params.get("factor")
        original = params.get("original_max_position_embeddings")
        longrope = {}
        if rope_type == "longrope":  # Phi-3 keeps the original length beside rope_scaling
            original = original or cfg.get("original_max_position_embeddings")
            if not original or "short_factor" not in params or "long_factor" not in params:
                raise UnsupportedModelError("longrope scaling needs short_factor, long_factor and "
                                            "original_max_position_embeddings")
            longrope = dict(short_factor=tuple(float(x) for x in params["short_factor"]),
                            long_factor=tuple(float(x) for x in params["long_factor"]))
        if rope_type in ("yarn", "longrope") and factor is None and original:  # the ratio of the two lengths
            factor = cfg["max_position_embeddings"] / original
        return RopeConfig(
            theta=theta,
            type=rope_type,
            factor=float(factor if factor is not None else 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(original or 8192),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=opt("attention_factor"),
            mscale=opt("mscale"),
            mscale_all_dim=opt("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
            **longrope,
        )


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a pyserve.registry name
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
    qkv_bias: bool  # Qwen2 always; Llama and Qwen3 when attention_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rotary
    o_bias: bool = False  # Llama and OLMo 2 with attention_bias
    mlp_bias: bool = False  # Llama with mlp_bias
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    sliding_window: int | None = None
    # Per layer, whether it attends through the sliding window (empty: no layer does).
    sliding_layers: tuple[bool, ...] = ()
    hidden_act: str = "silu"  # one of ACTIVATIONS
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    local_rope: RopeConfig | None = None  # Gemma 3: the rope of its sliding-window layers
    # Mixture of experts (Mixtral, Qwen3-MoE): experts per MoE layer, how many each token runs
    # through, each expert's MLP width, and whether the top-k routing weights are renormalised.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[bool, ...] = ()  # per layer, whether its MLP is the MoE block (empty: none is)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None: it attends to the whole context)."""
        return self.sliding_window if self.sliding_layers and self.sliding_layers[layer] else None

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> "ModelConfig":
        """From a config.json dict."""
        arch = by_hf_config(cfg).name
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported hidden_act {act!r} (supported: {', '.join(ACTIVATIONS)})")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope, local_rope = _hf_ropes(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        layers = int(cfg["num_hidden_layers"])
        sliding, sliding_layers = _hf_sliding_window(cfg, arch, layers)
        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", "gemma3_text", "qwen3_moe"),
            o_bias=arch in ("llama", "olmo2") and bool(cfg.get("attention_bias", False)),
            mlp_bias=arch == "llama" and bool(cfg.get("mlp_bias", False)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            sliding_window=sliding,
            sliding_layers=sliding_layers,
            hidden_act=act,
            attention_scale=(float(cfg["query_pre_attn_scalar"]) ** -0.5 if cfg.get("query_pre_attn_scalar")
                             else None),
            attn_logit_softcap=cfg.get("attn_logit_softcapping") or None,
            final_logit_softcap=cfg.get("final_logit_softcapping") or None,
            local_rope=local_rope,
            **_hf_moe(cfg, arch, layers),
        )


def _hf_ropes(cfg: dict[str, Any]) -> tuple[RopeConfig, RopeConfig | None]:
    """The rope of full-attention layers, and (Gemma 3) a different one for sliding-window layers:
    transformers 5 nests them under `rope_parameters` by layer type; older configs give the local
    layers' base as `rope_local_base_freq`."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        def one(kind: str) -> RopeConfig | None:
            sub = params.get(kind)
            return None if sub is None else RopeConfig.from_hf({**cfg, "rope_parameters": sub, "rope_scaling": None})
        full = one("full_attention") or RopeConfig.from_hf({**cfg, "rope_parameters": None})
        return full, one("sliding_attention")
    local = cfg.get("rope_local_base_freq")
    return RopeConfig.from_hf(cfg), (None if local is None else RopeConfig(theta=float(local)))


def _hf_sliding_window(cfg: dict[str, Any], arch: str, layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """The window, and which layers use it: `layer_types` where the config has it (transformers 5
    writes it for Qwen2/3 and Gemma), else Mistral's all-layers rule or Qwen2/3's
    `use_sliding_window` from layer `max_window_layers` on."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is None:
        if arch in ("mistral", "mixtral", "phi3") or (arch == "qwen3_moe" and cfg.get("use_sliding_window")):
            types = ["sliding_attention"] * layers
        elif arch == "gemma2":  # every other layer, from the first
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        elif arch == "gemma3_text":  # all but every sliding_window_pattern-th
            every = int(cfg.get("sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
        elif arch in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            start = int(cfg.get("max_window_layers", layers))
            types = ["full_attention" if i < start else "sliding_attention" for i in range(layers)]
        else:
            types = ["full_attention"] * layers
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown or len(types) != layers:
        raise UnsupportedModelError(f"unsupported layer_types {sorted(unknown) or types!r}")
    if not window or "sliding_attention" not in types:
        return None, ()
    return int(window), tuple(t == "sliding_attention" for t in types)



def _hf_moe(cfg: dict[str, Any], arch: str, layers: int) -> dict[str, Any]:
    """The MoE fields: Mixtral's experts replace every layer's MLP and are always renormalised;
    Qwen3-MoE's replace it except on `mlp_only_layers` and off every `decoder_sparse_step`-th layer
    (transformers' Qwen3MoeDecoderLayer), renormalised when `norm_topk_prob`."""
    if arch not in ("mixtral", "qwen3_moe"):
        return {}
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    if arch == "mixtral":
        moe = (experts > 0,) * layers
        width, renormalize = int(cfg["intermediate_size"]), True
    else:
        step, dense = int(cfg.get("decoder_sparse_step", 1)), set(cfg.get("mlp_only_layers") or ())
        moe = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers))
        width, renormalize = int(cfg["moe_intermediate_size"]), bool(cfg.get("norm_topk_prob", False))
    return dict(num_experts=experts, num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                moe_intermediate_size=width, norm_topk_prob=renormalize, moe_layers=moe)

@dataclass
class EngineConfig:
    """Cache and scheduling limits (the server's CLI flags map onto these)."""

    device: str = "cpu"
    dtype: str = "auto"
    # None: a GGUF file's own block formats, an HF checkpoint dense; "none": dequantize a GGUF file;
    # "q8_0" / "q4_0": quantize an HF checkpoint's linear weights at load (models/layers/quantized.py).
    quantization: str | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: float = 2.0  # GiB of KV cache on the CPU
    # auto: bfloat16 on a CPU with AVX512_BF16 under an fp32 model, else the model's dtype
    # (engine/kv_cache_dtype.py); float32/bfloat16/float16 on the CPU only (CUDA: the model's).
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9  # fraction of the GPU for weights + activations + KV cache
    num_gpu_blocks_override: int | None = None  # tests: an exact block count on any device
    enable_prefix_caching: bool = True
    seed: int = 0
    # Ranks the model is split over (distributed/): pyserve starts them on this host, or torchrun does.
    tensor_parallel_size: int = 1
    # Seconds a rank may wait for the others inside a step before the group counts as failed (a rank hung).
    distributed_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.quantization not in (None, "none", "q8_0", "q4_0"):
            raise ValueError(f"quantization must be none, q8_0 or q4_0, got {self.quantization!r}")
        if self.block_size not in (8, 16, 32):
            raise ValueError(f"block_size must be 8, 16 or 32, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        self._check_kv_cache_dtype()
        if not self.distributed_timeout > 0:
            raise ValueError(f"distributed_timeout must be > 0 s, got {self.distributed_timeout}")
        if not self.kv_cache_memory > 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def _check_kv_cache_dtype(self) -> None:
        """Fail at configuration, before any loading, for a cache dtype the device's kernels do not
        run with the model's dtype (resolve_dtype's auto: float32 on the CPU, bfloat16 on CUDA)."""
        import torch

        from pyserve.engine.kv_cache_dtype import resolve_kv_cache_dtype

        device = torch.device(self.device)
        names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        model = names.get(self.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        resolve_kv_cache_dtype(self.kv_cache_dtype, device, model, avx512_bf16=False)
