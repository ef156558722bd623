"""Plain-PyTorch references for the KV-cache and attention ops, and a builder
for the mixed batches the tests run through them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim] (num_tokens includes padding rows)
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    keys: list[torch.Tensor]  # per sequence [seq_len, num_kv_heads, head_dim], what the cache holds
    values: list[torch.Tensor]
    scale: float

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max()) if len(self.seq_lens) else 0

    def to(self, device) -> "PagedBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        moved["keys"] = [k.to(device) for k in self.keys]
        moved["values"] = [v.to(device) for v in self.values]
        return PagedBatch(**moved)


def make_paged_batch(
    seqs: list[tuple[int, int]],  # (cached tokens before this step, new tokens this step) per sequence
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    padding_rows: int = 0,
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedBatch:
    """Random K/V for every position of every sequence, scattered over randomly
    permuted cache blocks, as if reshape_and_cache had already run."""
    gen = torch.Generator().manual_seed(seed)
    lens = [cached + new for cached, new in seqs]
    blocks_per_seq = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq + [1])
    # Unused table entries point at a real block: the kernel must not read them anyway.
    block_tables = torch.full((len(seqs), max_blocks), perm[-1], dtype=torch.int32)
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    keys, values = [], []
    next_block = 0
    for s, n in enumerate(lens):
        ids = perm[next_block : next_block + blocks_per_seq[s]]
        next_block += blocks_per_seq[s]
        block_tables[s, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        slots = [ids[p // block_size] * block_size + p % block_size for p in range(n)]
        flat_k = key_cache.view(-1, num_kv_heads, head_dim)
        flat_v = value_cache.view(-1, num_kv_heads, head_dim)
        keys.append(flat_k[slots].clone())
        values.append(flat_v[slots].clone())
    new_tokens = [new for _, new in seqs]
    qsl = torch.tensor([0] + list(torch.tensor(new_tokens).cumsum(0).tolist()) if seqs else [0], dtype=torch.int32)
    num_tokens = int(qsl[-1]) + padding_rows
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    return PagedBatch(
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=block_tables,
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=qsl,
        keys=keys,
        values=values,
        scale=1.0 / math.sqrt(head_dim),
    )


def visible_keys(q_pos: torch.Tensor, kv_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """[len(q_pos), kv_len] bool: may the query at position q_pos[i] attend to
    the key at position j. Causal (j <= p), and with a window W > 0 also
    j > p - W, i.e. p - j < W."""
    kv_pos = torch.arange(kv_len, device=q_pos.device)
    visible = kv_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None and sliding_window > 0:
        visible &= kv_pos[None, :] > q_pos[:, None] - sliding_window
    return visible


def reference_attention(b: PagedBatch, sliding_window: int | None = None,
                        logits_soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention per sequence on contiguous K/V, in fp32.

    sliding_window W > 0: the query at position p sees keys j with
    p - j < W, written as transformers' sliding_window_overlay writes it
    (kv_idx > q_idx - W), on top of the causal mask (kv_idx <= q_idx).
    logits_soft_cap c > 0: scores = tanh(scores / c) * c after the scale, as
    Gemma 2's eager attention does."""
    num_tokens, num_heads, head_dim = b.query.shape
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=b.query.device)
    for s in range(len(b.seq_lens)):
        q0, q1 = int(b.query_start_loc[s]), int(b.query_start_loc[s + 1])
        n = int(b.seq_lens[s])
        if q1 == q0:
            continue
        q = b.query[q0:q1].float()  # [q_len, H, D]
        group = num_heads // b.keys[s].shape[1]
        k = b.keys[s].float().repeat_interleave(group, dim=1)  # [n, H, D]
        v = b.values[s].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * b.scale
        if logits_soft_cap is not None and logits_soft_cap > 0:
            scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
        q_pos = torch.arange(n - (q1 - q0), n, device=q.device)
        scores = scores.masked_fill(~visible_keys(q_pos, n, sliding_window)[None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def reference_slot_mapping(block_tables, seq_lens, query_start_loc, block_size, num_tokens):
    slots = torch.full((num_tokens,), -1, dtype=torch.int64)
    positions = torch.zeros(num_tokens, dtype=torch.int64)
    for s in range(len(seq_lens)):
        q0, q1 = int(query_start_loc[s]), int(query_start_loc[s + 1])
        first = int(seq_lens[s]) - (q1 - q0)
        for j in range(q1 - q0):
            p = first + j
            positions[q0 + j] = p
            slots[q0 + j] = int(block_tables[s, p // block_size]) * block_size + p % block_size
    return slots, positions
