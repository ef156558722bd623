"""Rank-side checks for test_layer_shards.py (run on every rank of a real group by tests/distributed/ranks.py):
each loads the model twice in its own process, whole (`using(SingleRank())`) and as this rank's shard, and
compares what the shard computes with the matching part of what the whole layer computes."""

from __future__ import annotations

import torch

from pyserve import _ops
from pyserve.distributed.state import SingleRank, using
from pyserve.models import AttentionMetadata, load_model
from pyserve.models.layers.parallel import split_attention, vocab_range


def _models(group, path, quantization):
    with using(SingleRank()):
        whole = load_model(path, quantization=quantization)
    with using(group):
        shard = load_model(path, quantization=quantization)
    return whole, shard


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def layers(group, path, quantization=None) -> dict[str, float]:
    """Per layer kind, the largest difference between the shard's result and the whole layer's."""
    whole, shard = _models(group, path, quantization)
    cfg, r = whole.cfg, group.rank
    split = split_attention(cfg, group)
    d = cfg.head_dim
    q0, qn = split.q_rows
    k0, kn = split.kv_rows
    q_full, kv_full = cfg.num_heads * d, cfg.num_kv_heads * d
    inter = cfg.intermediate_size
    i0, i_n = r * inter // group.size, inter // group.size
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for i in (0, len(whole.layers) - 1):
        lw, ls = whole.layers[i], shard.layers[i]
        x = torch.randn(7, cfg.hidden_size, generator=gen)
        y = lw.qkv_proj(x)
        want = torch.cat([y[:, q0: q0 + qn], y[:, q_full + k0: q_full + k0 + kn],
                          y[:, q_full + kv_full + k0: q_full + kv_full + k0 + kn]], dim=1)
        out[f"qkv_proj.{i}"] = _max_diff(ls.qkv_proj(x), want)
        y = lw.gate_up_proj(x)
        want = torch.cat([y[:, i0: i0 + i_n], y[:, inter + i0: inter + i0 + i_n]], dim=1)
        out[f"gate_up_proj.{i}"] = _max_diff(ls.gate_up_proj(x), want)
        a = torch.randn(7, q_full, generator=gen)
        out[f"o_proj.{i}"] = _max_diff(ls.o_proj(a[:, q0: q0 + qn].contiguous()), lw.o_proj(a))
        m = torch.randn(7, inter, generator=gen)
        out[f"down_proj.{i}"] = _max_diff(ls.down_proj(m[:, i0: i0 + i_n].contiguous()), lw.down_proj(m))
    per = vocab_range(cfg.vocab_size, group)[2]  # the same ids on every rank: each rank's first and last
    ids = torch.tensor([0, 1, cfg.vocab_size // 2, cfg.vocab_size - 1,
                        *[min(t, cfg.vocab_size - 1) for r in range(group.size) for t in (r * per, r * per + per - 1)]])
    out["embedding"] = _max_diff(shard.embed_tokens(ids), whole.embed_tokens(ids))
    h = torch.randn(5, cfg.hidden_size, generator=gen)
    logits = shard.lm_head(h)
    if r == 0:
        out["lm_head"] = _max_diff(logits, whole.lm_head(h))
    else:
        out["lm_head_none"] = float(logits is not None)
    return out


def logits(group, path, quantization=None, lengths=(23, 5, 40)):
    """One prefill of a few sequences through the sharded model on every rank (each with its own KV
    cache of its heads) and through the whole model: rank 0's (sharded, whole) final logits; None
    elsewhere."""
    whole, shard = _models(group, path, quantization)
    results = []
    for model in (whole, shard):
        block = 16
        blocks = [-(-n // block) for n in lengths]
        kv = model.allocate_kv_cache(sum(blocks), block, torch.float32)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.cfg.vocab_size, (sum(lengths),), generator=gen)
        starts = torch.tensor([0, *blocks]).cumsum(0)
        width = max(blocks)
        tables = torch.tensor([[starts[s] + j if j < blocks[s] else 0 for j in range(width)]
                               for s in range(len(lengths))], dtype=torch.int32)
        seq_lens = torch.tensor(lengths, dtype=torch.int32)
        qsl = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32)
        slots, positions = _ops.compute_slot_mapping(tables, seq_lens, qsl, block, len(ids))
        meta = AttentionMetadata(slots, tables, seq_lens, qsl, max(lengths))
        rows = qsl[1:].long() - 1  # each sequence's final logits, as the sampler gets them
        results.append(model.forward(ids, positions, kv, meta, rows))
    if group.rank != 0:
        assert results[1] is None
        return None
    return results[1], results[0]
