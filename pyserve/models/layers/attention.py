"""Attention over the paged KV cache: this step's K/V are written to their cache slots, then every
query attends causally to its sequence's cached keys (prefill chunks and decodes in one batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyserve import _ops


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, cached + new tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_seq_len: int


class PagedAttention:
    """sliding_window: a query at position p sees keys j with p - j < window (None: all);
    logits_soft_cap: scores become cap * tanh(score / cap) before the softmax (None: off)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window, self.logits_soft_cap = sliding_window, logits_soft_cap

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """q [tokens, heads, head_dim], k/v [tokens, kv_heads, head_dim] -> [tokens, heads, head_dim]."""
        key_cache, value_cache = kv_cache
        _ops.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        return _ops.paged_attention(q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                    meta.query_start_loc, self.scale, meta.max_seq_len,
                                    self.sliding_window, self.logits_soft_cap)
