"""A GGUF file as a pyserve model: its metadata as a ModelConfig and its
tensors renamed to Hugging Face names, so one model class serves both formats.

llama.cpp's converter interleaves the rows of q/k projections of `llama`
checkpoints for its own rotary layout; we undo that here so the weights match
the HF (rotate-half) convention our rotary embedding uses.
"""

from __future__ import annotations

import re

import torch

from pyserve.config import ModelConfig, RopeConfig, SUPPORTED_ARCHITECTURES, UnsupportedModelError
from pyserve.loader.gguf_reader import GGUFFile
from pyserve.loader.gguf_types import GGUFError

# GGUF architectures we read, and whether llama.cpp permuted their q/k rows.
GGUF_ARCHITECTURES = {"llama": True, "qwen2": False}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_model_config(gguf: GGUFFile) -> ModelConfig:
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf.path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")

    def need(key: str):
        full = f"{arch}.{key}"
        if full not in meta:
            raise GGUFError(f"{gguf.path}: metadata key {full!r} is missing")
        return meta[full]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", hidden // heads)))
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    rope = RopeConfig(theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)))
    if scaling not in ("none", None):
        raise UnsupportedModelError(f"{gguf.path}: unsupported rope scaling {scaling!r} in GGUF metadata")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(int(i) for i in (eos, eot) if i is not None))
    assert arch in SUPPORTED_ARCHITECTURES
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope=rope,
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        qkv_bias=arch == "qwen2",
        eos_token_ids=eos_ids,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
    )


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k permutation: per head, rows were reordered
    from [first half, second half] to interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_to_hf_weights(tensors: dict[str, torch.Tensor], cfg: ModelConfig, path: str) -> dict[str, torch.Tensor]:
    permuted = GGUF_ARCHITECTURES[cfg.architecture]
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[name]] = t
            continue
        m = _LAYER.fullmatch(name)
        if m is None or m.group(2) not in _LAYER_NAMES:
            continue  # e.g. rope_freqs: derived from the config instead
        hf = _LAYER_NAMES[m.group(2)]
        if permuted and hf.startswith("self_attn.q_proj"):
            t = unpermute_rows(t, cfg.num_heads)
        elif permuted and hf.startswith("self_attn.k_proj"):
            t = unpermute_rows(t, cfg.num_kv_heads)
        out[f"model.layers.{m.group(1)}.{hf}"] = t
    tensors.clear()
    return out
