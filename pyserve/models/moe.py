"""Mixture-of-experts models: Qwen3-MoE and Mixtral, the Llama decoder with its MLP replaced by a
sparse MoE block (layers/moe.py) on the layers the config says (`ModelConfig.moe_layers`).

Qwen3-MoE is Qwen3's attention (per-head q/k norms) with experts under `mlp.` (`mlp.gate` the router,
`mlp.experts.{e}.{gate,up,down}_proj`), top-k weights renormalised when `norm_topk_prob`, and dense
MLPs on its `mlp_only_layers` / off `decoder_sparse_step`. Mixtral is Mistral's attention with
experts under `block_sparse_moe.` (`w1` gate, `w3` up, `w2` down), always renormalised.
"""

from __future__ import annotations

import torch

from pyserve.config import ModelConfig
from pyserve.models.layers.moe import Experts, SparseMoE
from pyserve.models.llama import LlamaDecoderLayer, LlamaModel


class MoEDecoderLayer(LlamaDecoderLayer):
    moe_prefix = "mlp"  # checkpoint module of the MoE block
    down_name = "down_proj"  # checkpoint name of an expert's down projection

    def __init__(self, cfg: ModelConfig, index: int, dtype: torch.dtype, device: torch.device):
        super().__init__(cfg, index, dtype, device)
        self.moe = None
        if cfg.moe_layers and cfg.moe_layers[index]:
            self.gate_up_proj = self.down_proj = None  # the experts are this layer's MLP
            self.moe = SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                                 renormalize=cfg.norm_topk_prob, act=cfg.hidden_act, down_name=self.down_name,
                                 dtype=dtype, device=device)

    def named_modules(self, prefix: str) -> dict[str, object]:
        modules = {name: m for name, m in super().named_modules(prefix).items() if m is not None}
        if self.moe is not None:
            modules |= self.moe.named_modules(f"{prefix}.{self.moe_prefix}")
        return modules

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return super().mlp(x) if self.moe is None else self.moe(x)


class MixtralDecoderLayer(MoEDecoderLayer):
    moe_prefix = "block_sparse_moe"
    down_name = "w2"


class Qwen3MoeModel(LlamaModel):
    decoder_layer = MoEDecoderLayer

    def warm_up_matmuls(self, max_tokens: int, max_logit_rows: int) -> None:
        super().warm_up_matmuls(max_tokens, max_logit_rows)  # attention, dense MLPs, routers, head
        experts = next((m for m in self.named_modules().values() if isinstance(m, Experts)), None)
        if experts is not None:  # every MoE layer's experts have the same shapes
            experts.warm_up(max_tokens)


class MixtralModel(Qwen3MoeModel):
    decoder_layer = MixtralDecoderLayer
    packed_modules = {**LlamaModel.packed_modules, "w1": ("gate_up_proj", "gate"), "w3": ("gate_up_proj", "up")}
