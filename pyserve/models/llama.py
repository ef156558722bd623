"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) on pyserve's kernels.

One forward runs a flat batch of tokens from many sequences — prefill chunks
and single-token decodes mixed — against the paged KV cache. Attention and
cache writes go through pyserve._C; matmuls are torch's. Weights arrive in
Hugging Face naming (the GGUF loader translates to it); q/k/v and gate/up are
fused at load time so each layer runs two big matmuls instead of five, and
every matmul weight is laid out for its library once (models/linear.py).
"""

from __future__ import annotations

import math
import mmap
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyserve import _ops
from pyserve.config import ModelConfig
from pyserve.loader.hf import ModelLoadError
from pyserve.models.linear import Linear
from pyserve.models.prefault import populate_in_background
from pyserve.models.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, cached + new tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_seq_len: int


class MissingWeightError(ModelLoadError):
    """A weight the architecture needs is absent or has the wrong shape."""


class UnexpectedWeightError(ModelLoadError):
    """The checkpoint holds a weight the architecture does not use."""


# Checkpoint tensors that hold nothing we compute from, and why; any other tensor left over after
# loading is an error, since dropping it silently would run a different model.
IGNORED_WEIGHTS = {
    re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"):
        "older checkpoints saved the rotary inverse frequencies; they are recomputed from the config",
}


def _refuse_leftovers(w: dict[str, torch.Tensor]) -> None:
    leftover = [k for k in w if not any(p.fullmatch(k) for p in IGNORED_WEIGHTS)]
    if leftover:
        more = f" and {len(leftover) - 3} more" if len(leftover) > 3 else ""
        raise UnexpectedWeightError(f"weight {', '.join(sorted(leftover)[:3])}{more} is not used by this "
                                    f"architecture; refusing to load a model it would change")


class LlamaLayer:
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], prefix: str):
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        shapes = {
            "input_layernorm.weight": (cfg.hidden_size,),
            "post_attention_layernorm.weight": (cfg.hidden_size,),
            "self_attn.q_proj.weight": (q_size, cfg.hidden_size),
            "self_attn.k_proj.weight": (kv_size, cfg.hidden_size),
            "self_attn.v_proj.weight": (kv_size, cfg.hidden_size),
            "self_attn.q_proj.bias": (q_size,),
            "self_attn.k_proj.bias": (kv_size,),
            "self_attn.v_proj.bias": (kv_size,),
            "self_attn.q_norm.weight": (cfg.head_dim,),
            "self_attn.k_norm.weight": (cfg.head_dim,),
            "self_attn.o_proj.weight": (cfg.hidden_size, q_size),
            "mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
            "mlp.up_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
            "mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size),
        }

        def take(name: str) -> torch.Tensor:
            key = prefix + name
            if key not in w:
                raise MissingWeightError(f"weight {key!r} is missing")
            t = w.pop(key)
            if tuple(t.shape) != shapes[name]:
                raise MissingWeightError(f"weight {key!r} has shape {tuple(t.shape)}, the config implies {shapes[name]}")
            return t

        self.cfg = cfg
        self.input_norm = take("input_layernorm.weight")
        self.post_attention_norm = take("post_attention_layernorm.weight")
        qkv_bias = None
        if cfg.qkv_bias:
            qkv_bias = torch.cat([take("self_attn.q_proj.bias"), take("self_attn.k_proj.bias"),
                                  take("self_attn.v_proj.bias")])
        self.qkv = Linear(torch.cat([take("self_attn.q_proj.weight"), take("self_attn.k_proj.weight"),
                                     take("self_attn.v_proj.weight")]), qkv_bias)
        self.q_norm = take("self_attn.q_norm.weight") if cfg.qk_norm else None
        self.k_norm = take("self_attn.k_norm.weight") if cfg.qk_norm else None
        self.o = Linear(take("self_attn.o_proj.weight"))
        self.gate_up = Linear(torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")]))
        self.down = Linear(take("mlp.down_proj.weight"))
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5

    def __call__(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                 rotary: RotaryEmbedding, kv_cache: tuple[torch.Tensor, torch.Tensor],
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if residual is None:  # first layer: the embeddings are the residual stream
            residual, x = h, _ops.rms_norm(h, self.input_norm, cfg.rms_norm_eps)
        else:  # residual += h; x = norm(residual), in place
            _ops.fused_add_rms_norm(h, residual, self.input_norm, cfg.rms_norm_eps)
            x = h
        qkv = self.qkv(x)
        n = qkv.shape[0]
        q = qkv[:, : self.q_size].view(n, cfg.num_heads, cfg.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(n, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:  # Qwen3: each head normalised on its own, before rotary
            for heads, weight in ((q, self.q_norm), (k, self.k_norm)):
                heads.copy_(_ops.rms_norm(heads.reshape(-1, cfg.head_dim), weight, cfg.rms_norm_eps).view_as(heads))
        rotary(positions, q, k)  # in place, inside qkv
        key_cache, value_cache = kv_cache
        _ops.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        attn = _ops.paged_attention(q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                    meta.query_start_loc, self.scale, meta.max_seq_len)
        h = self.o(attn.view(n, self.q_size))
        _ops.fused_add_rms_norm(h, residual, self.post_attention_norm, cfg.rms_norm_eps)
        return self.down(_ops.silu_and_mul(self.gate_up(h))), residual


class LlamaModel:
    """Holds the weights; `forward` maps a flat token batch to logits."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, max_positions: int | None = None):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        weights.clear()  # the caller's copies are no longer needed; let them go
        if "model.embed_tokens.weight" not in w:
            raise MissingWeightError("weight 'model.embed_tokens.weight' is missing")
        self.embed = w.pop("model.embed_tokens.weight")
        if tuple(self.embed.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise MissingWeightError(
                f"model.embed_tokens.weight has shape {tuple(self.embed.shape)}, config says "
                f"({cfg.vocab_size}, {cfg.hidden_size})")
        self.layers = [LlamaLayer(cfg, w, f"model.layers.{i}.") for i in range(cfg.num_layers)]
        if "model.norm.weight" not in w:
            raise MissingWeightError("weight 'model.norm.weight' is missing")
        self.norm = w.pop("model.norm.weight")
        lm_head = w.pop("lm_head.weight", None)
        if lm_head is None or cfg.tie_word_embeddings:
            lm_head = self.embed
        elif tuple(lm_head.shape) != tuple(self.embed.shape):
            raise MissingWeightError(f"lm_head.weight has shape {tuple(lm_head.shape)}, the config implies "
                                     f"{tuple(self.embed.shape)}")
        self.lm_head = Linear(lm_head)
        _refuse_leftovers(w)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope,
                                      device, dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [num_tokens]; logits_indices: [num_outputs]
        rows whose next-token logits are wanted. Returns [num_outputs, vocab] fp32."""
        h = F.embedding(input_ids, self.embed)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, positions, self.rotary, kv_cache, meta)
        # Only the rows that need logits pay for the final norm and the vocab matmul.
        h = (h + residual)[logits_indices]
        h = _ops.rms_norm(h, self.norm, self.cfg.rms_norm_eps)
        return self.lm_head(h).float()

    def warm_up_matmuls(self, max_tokens: int, max_logit_rows: int) -> None:
        """Build every matmul primitive a step of up to max_tokens tokens and max_logit_rows sampled rows
        can use (models/linear.py), so that serving builds and caches none."""
        layer = self.layers[0]  # a primitive depends on shapes, not on weights: one layer warms them all
        for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
            linear.warm_up_shapes(max_tokens)
        self.lm_head.warm_up_shapes(max_logit_rows)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads, head_dim], zeroed."""
        shape = (num_blocks, block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        layers = self.cfg.num_layers
        if self.device.type == "cpu":
            # An anonymous mapping is zero-filled by the kernel a page at a time, on first touch, so a
            # cache of gigabytes costs nothing at startup (torch.zeros writes every byte: ~0.3 s/GiB);
            # a background thread then backs it with memory before requests need it (prefault.py).
            nbytes = 2 * layers * math.prod(shape) * self.embed.element_size()
            buf = mmap.mmap(-1, nbytes)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                buf.madvise(mmap.MADV_HUGEPAGE)  # fewer, larger faults where the kernel grants them
            caches = torch.frombuffer(buf, dtype=self.dtype).view(2 * layers, *shape)
            populate_in_background(buf)
        else:
            caches = torch.zeros((2 * layers, *shape), device=self.device, dtype=self.dtype)
        return [(caches[2 * i], caches[2 * i + 1]) for i in range(layers)]
