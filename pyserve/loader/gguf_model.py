"""A GGUF file as a pyserve model: its metadata (and rope_freqs tensor) as a ModelConfig and its
tensors renamed to Hugging Face names, so one model class serves both formats.

Every metadata key and tensor is accounted for: read, known to be harmless (the tables below say
why), or refused by name. llama.cpp's converter writes some of what changes the computation only
as a tensor (Llama 3's rope scaling) or as a key a reader can skip (a sliding window), and a reader
that skips it silently decodes a different model.

llama.cpp's converter interleaves the rows of q/k projections of `llama`
checkpoints for its own rotary layout; we undo that here so the weights match
the HF (rotate-half) convention our rotary embedding uses.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from pyserve.config import ModelConfig, RopeConfig, UnsupportedModelError
from pyserve.loader.gguf_dequant import dequantize
from pyserve.loader.gguf_reader import GGUFFile
from pyserve.loader.gguf_types import GGUFError
from pyserve.models.layers.quantized import QuantizedTensor
from pyserve.registry import by_gguf_name, by_name

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Where llama.cpp's name means something else for an architecture: OLMo 2's norms come after
# attention and MLP (Gemma's too), so its HF post_attention_layernorm is llama.cpp's post_attention_norm.
_ARCH_LAYER_NAMES = {
    "olmo2": {"post_attention_norm.weight": "post_attention_layernorm.weight",
              "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
              "ffn_norm.weight": None},  # not an OLMo 2 tensor: refused
    **{gemma: {"post_attention_norm.weight": "post_attention_layernorm.weight",
               "ffn_norm.weight": "pre_feedforward_layernorm.weight",
               "post_ffw_norm.weight": "post_feedforward_layernorm.weight"} for gemma in ("gemma2", "gemma3_text")},
    # Phi-3's fused projections: q/k/v in one tensor, and gate/up in ffn_up (twice the MLP width).
    "phi3": {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"},
    # Experts: the router, and each projection stacked over the experts ([E, I, H] gate/up, [E, H, I]
    # down), named for the MoE layer's stacked slots (models/layers/moe.py).
    **{arch: {"ffn_gate_inp.weight": f"{moe}.gate.weight", "ffn_gate_exps.weight": f"{moe}.experts.gate_proj",
              "ffn_up_exps.weight": f"{moe}.experts.up_proj", "ffn_down_exps.weight": f"{moe}.experts.down_proj"}
       for arch, moe in (("qwen3_moe", "mlp"), ("mixtral", "block_sparse_moe"))},
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors that become part of the ModelConfig rather than a weight.
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency rope divisors (Llama 3's scaling lives only here)
# Phi-3's longrope divisors, for contexts beyond the original one and within it.
ROPE_LONG, ROPE_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"
_CONFIG_TENSORS = {ROPE_FREQS, ROPE_LONG, ROPE_SHORT}
# Tensors llama.cpp's files may hold that we deliberately leave unread, and why. Every other tensor
# is mapped above or refused by name: a tensor we drop is a computation we silently skip.
IGNORED_TENSORS: dict[str, str] = {}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")

# `{arch}.` metadata keys, by what we do with them. READ: turned into the ModelConfig below.
_READ_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.dimension_count", "rope.freq_base",
    "rope.scale_linear", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.yarn_attn_factor", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
    "rope.scaling.yarn_ext_factor", "rope.scaling.attn_factor", "attention.sliding_window", "attention.sliding_window_pattern",
    "attn_logit_softcapping", "final_logit_softcapping", "rope.freq_base_swa",
    "expert_count", "expert_used_count", "expert_feed_forward_length",
})
# Features we do not implement, accepted only at the value that switches them off.
_OFF_VALUES = {
    "attention.causal": True,
    "rope.scaling.yarn_log_multiplier": 0.0,  # DeepSeek's mscale_all_dim
    "logit_scale": 1.0, "embedding_scale": 1.0, "residual_scale": 1.0,
}
# Known and left unread, with the reason.
IGNORED_KEYS = {
    "rope.scaling.finetuned": "records whether the model was fine-tuned at the scaled length; computes nothing",
}
# Whole namespaces outside `{arch}.`.
_NAMESPACES = {
    "general.": None,  # descriptive (name, license, file type...); general.alignment is the reader's
    "tokenizer.": None,  # the tokenizer's (gguf_tokenizer_keys)
    "quantize.": None,  # how the file was quantized (importance matrix provenance); computes nothing
}


def _check_metadata(meta: dict, arch: str, path: str) -> None:
    """Refuse, by name, every metadata key that would change the computation in a way we do not
    reproduce; see the tables above."""
    for key, value in meta.items():
        if any(key.startswith(ns) for ns in _NAMESPACES):
            continue
        if key == "split.count":
            if int(value) > 1:
                raise UnsupportedModelError(
                    f"{path}: split GGUF files ({value} parts) are not supported; merge them first "
                    f"(llama-gguf-split --merge)")
            continue
        if key.startswith("split."):
            continue
        if not key.startswith(arch + "."):
            raise UnsupportedModelError(f"{path}: GGUF metadata key {key!r} is not understood by pyserve")
        sub = key[len(arch) + 1:]
        if sub in _READ_KEYS or sub in IGNORED_KEYS:
            continue
        if sub in _OFF_VALUES:
            if value == _OFF_VALUES[sub]:
                continue
            raise UnsupportedModelError(f"{path}: GGUF metadata {key} = {value!r} is not supported "
                                        f"(only {_OFF_VALUES[sub]!r})")
        raise UnsupportedModelError(f"{path}: GGUF metadata key {key!r} is not understood by pyserve")


def _rope_config(meta: dict, arch: str, gguf: GGUFFile) -> RopeConfig:
    """llama.cpp's rope metadata (and rope factor tensors) as a RopeConfig, with transformers' meaning."""
    def get(key: str, default=None):
        return meta.get(f"{arch}.{key}", default)

    path = gguf.path
    theta = float(get("rope.freq_base", 10000.0))
    rope_freqs, long, short = (_read_vector(gguf, name) for name in (ROPE_FREQS, ROPE_LONG, ROPE_SHORT))
    factors = rope_freqs
    attn = get("rope.scaling.attn_factor")
    if long is not None or short is not None:  # Phi-3's longrope; the type is not written
        if long is None or short is None or get("rope.scaling.original_context_length") is None:
            raise GGUFError(f"{path}: longrope scaling needs {ROPE_LONG}, {ROPE_SHORT} and "
                            f"{arch}.rope.scaling.original_context_length")
        original = int(get("rope.scaling.original_context_length"))
        return RopeConfig(theta=theta, type="longrope", factor=int(get("context_length")) / original,
                          original_max_position_embeddings=original, short_factor=short, long_factor=long,
                          attention_factor=None if attn is None else float(attn), freq_factors=factors)
    if attn is not None and float(attn) != 1.0:
        raise UnsupportedModelError(f"{path}: GGUF metadata {arch}.rope.scaling.attn_factor = {attn!r} is not "
                                    f"supported without longrope factors (only 1.0)")
    # llama.cpp reads an absent type as linear; factor 1 (or 0, "unset") is no scaling.
    kind = get("rope.scaling.type") or "linear"
    factor = get("rope.scaling.factor")
    if factor is None and get("rope.scale_linear") is not None:
        factor = get("rope.scale_linear")
    factor = float(factor) if factor else 1.0
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return RopeConfig(theta=theta, freq_factors=factors)
    if kind == "linear":
        return RopeConfig(theta=theta, type="linear", factor=factor, freq_factors=factors)
    if kind == "yarn":
        ext = get("rope.scaling.yarn_ext_factor")
        if ext is not None and float(ext) != 1.0:
            raise UnsupportedModelError(f"{path}: yarn rope scaling with {arch}.rope.scaling.yarn_ext_factor = "
                                        f"{ext} is not supported (only 1)")
        original = get("rope.scaling.original_context_length")
        if original is None:
            raise GGUFError(f"{path}: yarn rope scaling without {arch}.rope.scaling.original_context_length")
        attn = get("rope.scaling.yarn_attn_factor")
        return RopeConfig(theta=theta, type="yarn", factor=factor, original_max_position_embeddings=int(original),
                          beta_fast=float(get("rope.scaling.yarn_beta_fast", 32.0)),
                          beta_slow=float(get("rope.scaling.yarn_beta_slow", 1.0)),
                          attention_factor=None if attn is None else float(attn), freq_factors=factors)
    raise UnsupportedModelError(f"{path}: rope scaling {kind!r} ({arch}.rope.scaling.type) is not supported "
                                f"(supported: none, linear, yarn, and llama3 through {ROPE_FREQS})")


def _sliding_window(meta: dict, arch: str, layers: int, every: int | None,
                    path: str) -> tuple[int | None, tuple[bool, ...]]:
    """`attention.sliding_window` (0: none), on the layers `attention.sliding_window_pattern` marks;
    without a pattern, all but every `every`-th layer (llama.cpp's fixed Gemma patterns), or every
    layer (Mistral's rule)."""
    window = int(meta.get(f"{arch}.attention.sliding_window", 0))
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if window <= 0:
        return None, ()
    if pattern is None:
        pattern = [bool((i + 1) % every) if every else True for i in range(layers)]
    if len(pattern) != layers:
        raise GGUFError(f"{path}: {arch}.attention.sliding_window_pattern has {len(pattern)} entries for "
                        f"{layers} layers")
    return (window, tuple(bool(x) for x in pattern)) if any(pattern) else (None, ())


_GEMMA = ("gemma2", "gemma3_text")
# llama.cpp's converter writes Gemma's window but not which layers use it: llama.cpp fixes the
# pattern per architecture (Gemma 2 every other layer, Gemma 3 five in six), as transformers does.
_DEFAULT_SWA_EVERY = {"gemma2": 2, "gemma3_text": 6}


def _gemma_attention_scale(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> float | None:
    """Gemma's query_pre_attn_scalar is not in the file; llama.cpp uses hidden / heads for the 27B
    models (46 layers in Gemma 2, 62 in Gemma 3), head_dim otherwise, as their configs say."""
    if arch not in _GEMMA:
        return None
    big = layers == (46 if arch == "gemma2" else 62)
    return (hidden / heads if big else head_dim) ** -0.5


def gguf_model_config(gguf: GGUFFile) -> ModelConfig:
    """The ModelConfig of a GGUF file, after refusing what it holds that we would not reproduce."""
    meta = gguf.metadata
    prefix = meta.get("general.architecture")  # of the metadata keys; `arch` is pyserve's name
    arch = by_gguf_name(prefix, gguf.path).name
    if arch == "llama" and meta.get("llama.expert_count"):
        arch = "mixtral"  # llama.cpp writes Mixtral as llama with experts
    _check_metadata(meta, prefix, gguf.path)
    check_tensor_names(gguf, arch)

    def need(key: str):
        full = f"{prefix}.{key}"
        if full not in meta:
            raise GGUFError(f"{gguf.path}: metadata key {full!r} is missing")
        return meta[full]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    # llama.cpp's defaults: heads of hidden / heads dimensions, all of them rotated.
    head_dim = int(meta.get(f"{prefix}.attention.key_length", hidden // heads))
    value_dim = int(meta.get(f"{prefix}.attention.value_length", head_dim))
    rotary_dim = int(meta.get(f"{prefix}.rope.dimension_count", head_dim))
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{gguf.path}: value heads of {value_dim} and key heads of {head_dim} "
                                    f"dimensions are not supported (they must be equal)")
    if rotary_dim != head_dim:
        raise UnsupportedModelError(f"{gguf.path}: partial rotary embeddings ({prefix}.rope.dimension_count = "
                                    f"{rotary_dim} of head_dim {head_dim}) are not supported")
    layers = int(need("block_count"))
    window, sliding_layers = _sliding_window(meta, prefix, layers, _DEFAULT_SWA_EVERY.get(arch), gguf.path)
    vocab = meta.get(f"{prefix}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    # End of turn and end of message (Llama 3.1's <|eom_id|>, after a tool call) end generation too,
    # as in llama.cpp and the models' own generation_config.json.
    ends = (eos, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id"))
    eos_ids = tuple(dict.fromkeys(int(i) for i in ends if i is not None))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{prefix}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope=_rope_config(meta, prefix, gguf),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in gguf.tensors,
        qk_norm=arch in ("qwen3", "gemma3_text", "qwen3_moe"),
        o_bias="blk.0.attn_output.bias" in gguf.tensors,
        eos_token_ids=eos_ids,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        sliding_window=window,
        sliding_layers=sliding_layers,
        hidden_act="gelu_pytorch_tanh" if arch in _GEMMA else "silu",
        attention_scale=_gemma_attention_scale(arch, layers, hidden, heads, head_dim),
        attn_logit_softcap=meta.get(f"{prefix}.attn_logit_softcapping") or None,
        final_logit_softcap=meta.get(f"{prefix}.final_logit_softcapping") or None,
        local_rope=(RopeConfig(theta=float(meta.get(f"{prefix}.rope.freq_base_swa", 10000.0)))
                    if arch == "gemma3_text" else None),
        **_gguf_moe(meta, prefix, arch, layers, gguf.path, gguf.tensors),
    )


def _gguf_moe(meta: dict, prefix: str, arch: str, layers: int, path: str, tensors) -> dict:
    """`expert_count` experts on every layer (as llama.cpp builds both architectures), `expert_used_count`
    per token, each `expert_feed_forward_length` wide (Qwen3-MoE; Mixtral's are `feed_forward_length`).
    llama.cpp renormalises the top-k weights of both (its converter does not store Qwen3-MoE's
    norm_topk_prob, and Mixtral always does)."""
    experts = int(meta.get(f"{prefix}.expert_count", 0))
    if arch not in ("mixtral", "qwen3_moe") or not experts:
        return {}
    if f"{prefix}.expert_used_count" not in meta:
        raise GGUFError(f"{path}: metadata key {prefix + '.expert_used_count'!r} is missing")
    routers = [f"blk.{i}.ffn_gate_inp.weight" for i in range(layers)]
    if any(r not in tensors for r in routers):
        raise GGUFError(f"{path}: {prefix}.expert_count = {experts} but tensor "
                        f"{next(r for r in routers if r not in tensors)} (a layer's router) is missing")
    width = meta.get(f"{prefix}.expert_feed_forward_length") or meta[f"{prefix}.feed_forward_length"]
    return dict(num_experts=experts, num_experts_per_tok=int(meta[f"{prefix}.expert_used_count"]),
                moe_intermediate_size=int(width), norm_topk_prob=True, moe_layers=(True,) * layers)


def unpermute_rows(w, num_heads: int):
    """Inverse of llama.cpp's q/k permutation: per head, rows were reordered
    from [first half, second half] to interleaved pairs. A weight kept in GGUF blocks is permuted by
    whole rows (a block never spans two rows)."""
    if isinstance(w, QuantizedTensor):
        return w.take_rows(unpermute_rows(torch.arange(w.shape[0]), num_heads))
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(name: str, architecture: str) -> str | None:
    """The HF name of a GGUF tensor; None for the config and ignored tensors; KeyError if unknown."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name in _CONFIG_TENSORS or name in IGNORED_TENSORS:
        return None
    m = _LAYER.fullmatch(name)
    names = _LAYER_NAMES | _ARCH_LAYER_NAMES.get(architecture, {})
    if m is None or names.get(m.group(2)) is None:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}"


def check_tensor_names(gguf: GGUFFile, architecture: str) -> None:
    """Refuse a file with tensors we would not use, naming them, before anything is dequantized."""
    unknown = []
    for name in gguf.tensors:
        try:
            _hf_name(name, architecture)
        except KeyError:
            unknown.append(name)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise UnsupportedModelError(f"{gguf.path}: GGUF tensor {', '.join(unknown[:3])}{more} is not used by "
                                    f"pyserve's {architecture} model; refusing to load a model it would change")


def _read_vector(gguf: GGUFFile, name: str) -> tuple[float, ...] | None:
    """A small config tensor (rope factors) as floats; None when the file lacks it."""
    if name not in gguf.tensors:
        return None
    info = gguf.tensors[name]
    return tuple(float(x) for x in np.asarray(dequantize(gguf.raw(name), info.ggml_type, name)).reshape(-1))


def gguf_to_hf_weights(tensors: dict[str, torch.Tensor], cfg: ModelConfig, path: str) -> dict[str, torch.Tensor]:
    """Rename (and un-permute) the file's tensors to HF names (check_tensor_names vetted them)."""
    permuted = by_name(cfg.architecture).gguf_permuted_qk
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        hf = _hf_name(name, cfg.architecture)
        if hf is None:
            continue
        if cfg.architecture in _GEMMA and hf.endswith("norm.weight"):
            t = t - 1  # llama.cpp's converter stores Gemma's norm weights as 1 + w
        if permuted and ".self_attn.q_proj." in hf:
            t = unpermute_rows(t, cfg.num_heads)
        elif permuted and ".self_attn.k_proj." in hf:
            t = unpermute_rows(t, cfg.num_kv_heads)
        out[hf] = t
    tensors.clear()
    return out
