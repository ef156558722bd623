"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2; Phi-3 in phi3.py) on pyserve's kernels.

One forward runs a flat batch of tokens from many sequences — prefill chunks
and single-token decodes mixed — against the paged KV cache. q/k/v and gate/up
are fused into one layer each (`packed_modules`; Phi-3's checkpoints store them
fused already), so each decoder layer runs two big matmuls instead of five. Qwen2
adds q/k/v biases, Qwen3 an RMSNorm over each head of q and k before rotary.
"""

from __future__ import annotations

import re

import torch

from pyserve.config import ModelConfig
from pyserve.distributed.state import tensor_parallel
from pyserve.models.base import CausalLM
from pyserve.models.layers.activation import ACTIVATIONS, gated_mlp
from pyserve.models.layers.attention import AttentionMetadata, PagedAttention
from pyserve.models.layers.embedding import LMHead, VocabEmbedding
from pyserve.models.layers.linear import LinearLayer
from pyserve.models.layers.norm import RMSNorm
from pyserve.models.layers.parallel import split_attention
from pyserve.models.layers.rotary import RotaryEmbedding


class LlamaDecoderLayer:
    def __init__(self, cfg: ModelConfig, index: int, dtype: torch.dtype, device: torch.device):
        self.cfg = cfg
        like = dict(dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **like)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **like)
        self.init_attention(cfg, like, like, o_bias=cfg.o_bias, window=cfg.layer_window(index))
        self.init_mlp(cfg, like, bias=cfg.mlp_bias)

    def init_attention(self, cfg: ModelConfig, like: dict, norm_like: dict, *, o_bias: bool,
                       window: int | None) -> None:
        """Fused q/k/v (column-parallel: this rank's heads), the per-head q/k norms where the model has
        them, paged attention over this rank's heads, o_proj (row-parallel)."""
        split = split_attention(cfg, tensor_parallel())
        self.num_heads, self.num_kv_heads = split.num_heads, split.num_kv_heads
        self.q_size, self.kv_size = split.num_heads * cfg.head_dim, split.num_kv_heads * cfg.head_dim
        q_full, kv_full = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = LinearLayer(cfg.hidden_size, q_full + 2 * kv_full, bias=cfg.qkv_bias,
                                    output_shards={"q": q_full, "k": kv_full, "v": kv_full}, parallel="column",
                                    shard_ranges={"q": split.q_rows, "k": split.kv_rows, "v": split.kv_rows}, **like)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, **norm_like) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, **norm_like) if cfg.qk_norm else None
        self.o_proj = LinearLayer(q_full, cfg.hidden_size, bias=o_bias, parallel="row", **like)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, cfg.head_dim,
                                   cfg.attention_scale or cfg.head_dim ** -0.5, sliding_window=window,
                                   logits_soft_cap=cfg.attn_logit_softcap)

    def init_mlp(self, cfg: ModelConfig, like: dict, *, bias: bool) -> None:
        """gate/up fused (column-parallel), down (row-parallel)."""
        size = cfg.intermediate_size
        self.gate_up_proj = LinearLayer(cfg.hidden_size, 2 * size, bias=bias,
                                        output_shards={"gate": size, "up": size}, parallel="column", **like)
        self.act_and_mul = ACTIVATIONS[cfg.hidden_act]
        self.down_proj = LinearLayer(size, cfg.hidden_size, bias=bias, parallel="row", **like)

    def named_modules(self, prefix: str) -> dict[str, object]:
        modules = {"input_layernorm": self.input_layernorm, "post_attention_layernorm": self.post_attention_layernorm,
                   "self_attn.qkv_proj": self.qkv_proj, "self_attn.o_proj": self.o_proj,
                   "mlp.gate_up_proj": self.gate_up_proj, "mlp.down_proj": self.down_proj}
        if self.q_norm is not None:
            modules |= {"self_attn.q_norm": self.q_norm, "self_attn.k_norm": self.k_norm}
        return {f"{prefix}.{name}": m for name, m in modules.items()}

    def __call__(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                 rotary: RotaryEmbedding, kv_cache: tuple[torch.Tensor, torch.Tensor],
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # first layer: the embeddings are the residual stream
            residual, x = h, self.input_layernorm(h)
        else:  # residual += h; x = norm(residual), in place
            self.input_layernorm.add_and_norm(h, residual)
            x = h
        h = self.self_attention(x, positions, rotary, kv_cache, meta)
        self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual

    def self_attention(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                       kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """x [tokens, hidden] (normalised) -> the attention block's output [tokens, hidden]: fused q/k/v,
        the per-head q/k norms where the model has them, rotary, paged attention, o_proj."""
        d = self.cfg.head_dim
        qkv = self.qkv_proj(x)
        n = qkv.shape[0]
        q = qkv[:, : self.q_size].view(n, self.num_heads, d)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, self.num_kv_heads, d)
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, d)
        if self.q_norm is not None:
            self.q_norm.inplace(q)
            self.k_norm.inplace(k)
        rotary(positions, q, k)  # in place, inside qkv
        return self.o_proj(self.attn(q, k, v, kv_cache, meta).view(n, self.q_size))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward block on the normalised hidden state (MoE layers replace it)."""
        return gated_mlp(x, self.gate_up_proj, self.act_and_mul, self.down_proj)


class LlamaModel(CausalLM):
    """Holds the layers; `forward` maps a flat token batch to logits."""

    decoder_layer = LlamaDecoderLayer
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}
    ignored_weights = {
        re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"):
            "older checkpoints saved the rotary inverse frequencies; they are recomputed from the config",
    }

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, max_positions: int | None = None):
        super().__init__(cfg, device, dtype)
        like = dict(dtype=dtype, device=device)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, **like)
        self.layers = [self.decoder_layer(cfg, i, dtype, device) for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **like)
        tied = self.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, tied_to=tied, **like)
        if tied is not None:  # some tied checkpoints also save the (identical) head
            self.ignored_weights = {**self.ignored_weights, re.compile(r"lm_head\.weight"):
                                    "tied to model.embed_tokens.weight (tie_word_embeddings)"}
        # The served context (the engine's max_model_len), never past the model's own.
        self.max_positions = min(max_positions or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.rotary = RotaryEmbedding(cfg.head_dim, self.max_positions, cfg.rope, device, dtype)
        self.layer_rotary: object = self.rotary  # what each layer's __call__ gets (Gemma: one per layer kind)
        self.embed_scale: float | None = None  # Gemma: sqrt(hidden)

    def named_modules(self) -> dict[str, object]:
        modules: dict[str, object] = {"model.embed_tokens": self.embed_tokens}
        for i, layer in enumerate(self.layers):
            modules |= layer.named_modules(f"model.layers.{i}")
        return modules | {"model.norm": self.norm, "lm_head": self.lm_head}

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [num_tokens]; logits_indices: [num_outputs]
        rows whose next-token logits are wanted. Returns [num_outputs, vocab] fp32 (under tensor
        parallelism on rank 0; None on the other ranks)."""
        h = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, positions, self.layer_rotary, kv_cache, meta)
        # Only the rows that need logits pay for the final norm and the vocab matmul.
        h = self.norm((h + residual)[logits_indices])
        logits = self.lm_head(h)
        if logits is None:  # a tensor-parallel rank other than 0: rank 0 has the logits
            return None
        logits = logits.float()
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
