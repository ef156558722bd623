"""Gemma 2 and Gemma 3 (text): the Llama decoder with Gemma's differences.

- RMSNorm weights are offsets from 1 (`(1 + w) * x_normed`, in fp32: the kernels' weight_offset=1).
- Four norms per layer: before and after attention, before and after the MLP.
- Embeddings scaled by sqrt(hidden_size); GeLU-tanh MLP; attention scaled by
  query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5.
- Sliding-window attention on the layers `layer_types` marks (every other one in Gemma 2, five in
  six in Gemma 3), Gemma 3 with its own rope base on those layers.
- Gemma 2: attention scores and final logits soft-capped (cap * tanh(x / cap)); Gemma 3: an RMSNorm
  over each head of q and k before rotary instead.
"""

from __future__ import annotations

import math

import torch

from pyserve.config import ModelConfig
from pyserve.models.layers.activation import gated_mlp
from pyserve.models.layers.attention import AttentionMetadata
from pyserve.models.layers.norm import RMSNorm
from pyserve.models.layers.rotary import RotaryEmbedding
from pyserve.models.llama import LlamaDecoderLayer, LlamaModel

GEMMA_NORM = 1.0  # weight_offset of every Gemma RMSNorm


class GemmaDecoderLayer(LlamaDecoderLayer):
    """Builds its own layers (Gemma's norms and MLP); shares Llama's self_attention."""

    def __init__(self, cfg: ModelConfig, index: int, dtype: torch.dtype, device: torch.device):
        self.cfg = cfg
        self.window = cfg.layer_window(index)
        like = dict(dtype=dtype, device=device)
        norm = dict(like, weight_offset=GEMMA_NORM)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.init_attention(cfg, like, norm, o_bias=False, window=self.window)
        self.init_mlp(cfg, like, bias=False)

    def named_modules(self, prefix: str) -> dict[str, object]:
        modules = {"input_layernorm": self.input_layernorm, "post_attention_layernorm": self.post_attention_layernorm,
                   "pre_feedforward_layernorm": self.pre_feedforward_layernorm,
                   "post_feedforward_layernorm": self.post_feedforward_layernorm,
                   "self_attn.qkv_proj": self.qkv_proj, "self_attn.o_proj": self.o_proj,
                   "mlp.gate_up_proj": self.gate_up_proj, "mlp.down_proj": self.down_proj}
        if self.q_norm is not None:
            modules |= {"self_attn.q_norm": self.q_norm, "self_attn.k_norm": self.k_norm}
        return {f"{prefix}.{name}": m for name, m in modules.items()}

    def __call__(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                 rotary: dict[bool, RotaryEmbedding], kv_cache: tuple[torch.Tensor, torch.Tensor],
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # first layer: the embeddings are the residual stream
            residual, x = h, self.input_layernorm(h)
        else:  # residual += h (the last MLP's output); x = norm(residual)
            self.input_layernorm.add_and_norm(h, residual)
            x = h
        rope = rotary[self.window is not None]
        attn = self.post_attention_layernorm(self.self_attention(x, positions, rope, kv_cache, meta))
        self.pre_feedforward_layernorm.add_and_norm(attn, residual)  # residual += attn; attn = norm(residual)
        mlp = gated_mlp(attn, self.gate_up_proj, self.act_and_mul, self.down_proj)
        return self.post_feedforward_layernorm(mlp), residual


class GemmaModel(LlamaModel):
    decoder_layer = GemmaDecoderLayer

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, max_positions: int | None = None):
        super().__init__(cfg, device, dtype, max_positions)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device, weight_offset=GEMMA_NORM)
        local = (RotaryEmbedding(cfg.head_dim, self.max_positions, cfg.local_rope, device, dtype)
                 if cfg.local_rope is not None else self.rotary)
        self.layer_rotary = {False: self.rotary, True: local}  # by "is this a sliding-window layer"
        # transformers multiplies by the scale cast to the weights' dtype.
        self.embed_scale = torch.tensor(math.sqrt(cfg.hidden_size), dtype=dtype).item()
