"""OLMo 2: no norm before attention or MLP, an RMSNorm on each of their outputs before the residual
add, and an RMSNorm over the whole q and the whole k projection (not per head) before rotary."""

from __future__ import annotations

import torch

from pyserve.config import ModelConfig, UnsupportedModelError
from pyserve.distributed.state import tensor_parallel
from pyserve.models.layers.activation import ACTIVATIONS, gated_mlp
from pyserve.models.layers.attention import AttentionMetadata, PagedAttention
from pyserve.models.layers.linear import LinearLayer
from pyserve.models.layers.norm import RMSNorm
from pyserve.models.layers.rotary import RotaryEmbedding
from pyserve.models.llama import LlamaModel


class Olmo2DecoderLayer:
    def __init__(self, cfg: ModelConfig, index: int, dtype: torch.dtype, device: torch.device):
        if tensor_parallel().size > 1:
            raise UnsupportedModelError("OLMo 2 does not run under --tensor-parallel-size > 1 yet: its q/k norms "
                                        "span every head, which would take an all-gather per layer")
        self.cfg = cfg
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        like = dict(dtype=dtype, device=device)
        self.qkv_proj = LinearLayer(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias,
                                    output_shards={"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, **like)
        self.q_norm = RMSNorm(self.q_size, cfg.rms_norm_eps, **like)
        self.k_norm = RMSNorm(self.kv_size, cfg.rms_norm_eps, **like)
        self.o_proj = LinearLayer(self.q_size, cfg.hidden_size, bias=cfg.o_bias, **like)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   cfg.attention_scale or cfg.head_dim ** -0.5, sliding_window=cfg.layer_window(index),
                                   logits_soft_cap=cfg.attn_logit_softcap)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **like)
        self.gate_up_proj = LinearLayer(cfg.hidden_size, 2 * cfg.intermediate_size,
                                        output_shards={"gate": cfg.intermediate_size, "up": cfg.intermediate_size},
                                        **like)
        self.act_and_mul = ACTIVATIONS[cfg.hidden_act]
        self.down_proj = LinearLayer(cfg.intermediate_size, cfg.hidden_size, **like)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **like)

    def named_modules(self, prefix: str) -> dict[str, object]:
        modules = {"self_attn.qkv_proj": self.qkv_proj, "self_attn.q_norm": self.q_norm,
                   "self_attn.k_norm": self.k_norm, "self_attn.o_proj": self.o_proj,
                   "post_attention_layernorm": self.post_attention_layernorm, "mlp.gate_up_proj": self.gate_up_proj,
                   "mlp.down_proj": self.down_proj, "post_feedforward_layernorm": self.post_feedforward_layernorm}
        return {f"{prefix}.{name}": m for name, m in modules.items()}

    def __call__(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                 rotary: RotaryEmbedding, kv_cache: tuple[torch.Tensor, torch.Tensor],
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """h is the residual stream itself (there is no pre-norm to fuse the add into)."""
        cfg = self.cfg
        if residual is not None:
            h = h + residual
        qkv = self.qkv_proj(h)
        n = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=1)
        self.q_norm.inplace(q)
        self.k_norm.inplace(k)
        q, k = q.view(n, cfg.num_heads, cfg.head_dim), k.view(n, cfg.num_kv_heads, cfg.head_dim)
        rotary(positions, q, k)  # in place, inside qkv
        attn = self.attn(q, k, v.view(n, cfg.num_kv_heads, cfg.head_dim), kv_cache, meta)
        h = h + self.post_attention_layernorm(self.o_proj(attn.view(n, self.q_size)))
        mlp = gated_mlp(h, self.gate_up_proj, self.act_and_mul, self.down_proj)
        return self.post_feedforward_layernorm(mlp), h


class Olmo2Model(LlamaModel):
    """Llama's embedding, final norm and head around OLMo 2's layers."""

    decoder_layer = Olmo2DecoderLayer
