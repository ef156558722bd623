"""Rank-side checks of tensor-parallel experts (run by tests/distributed/test_moe_shards.py through
run_ranks): each rank loads a tiny MoE checkpoint sharded over its group and whole (SingleRank), feeds
both the same inputs and reports what its shards gave against the whole model."""

from __future__ import annotations

import torch

from pyserve import _ops
from pyserve.distributed.state import SingleRank, using
from pyserve.models import AttentionMetadata, load_model


def prefill_logits(model, ids: list[int], block_size: int = 16) -> torch.Tensor | None:
    """One prefill of `ids` as a single sequence; the last position's logits (None on ranks > 0)."""
    blocks = -(-len(ids) // block_size)
    kv_caches = model.allocate_kv_cache(blocks + 1, block_size)
    block_tables = torch.tensor([list(range(1, blocks + 1))], dtype=torch.int32)  # block 0 left unused
    seq_lens = torch.tensor([len(ids)], dtype=torch.int32)
    qsl = torch.tensor([0, len(ids)], dtype=torch.int32)
    slots, positions = _ops.compute_slot_mapping(block_tables, seq_lens, qsl, block_size, len(ids))
    meta = AttentionMetadata(slots, block_tables, seq_lens, qsl, len(ids))
    return model.forward(torch.tensor(ids), positions, kv_caches, meta, torch.tensor([len(ids) - 1]))


def sharded_against_whole(group, folders: list[str], token_counts: list[int], prompt_len: int) -> dict:
    """Per folder: each MoE layer's largest |sharded - whole| for x of each token count, the experts'
    intermediate rows on this rank, and the prompt's last logits sharded (None off rank 0) and whole."""
    torch.manual_seed(0)
    out = {}
    for folder in folders:
        with using(SingleRank()):
            whole = load_model(folder, dtype="float32")
        with using(group):
            sharded = load_model(folder, dtype="float32")
        layers = [i for i, layer in enumerate(whole.layers) if layer.moe is not None]
        diffs = {}
        for tokens in token_counts:
            # The same x on every rank, as the residual stream is after an all-reduce.
            x = torch.randn(tokens, whole.cfg.hidden_size, generator=torch.Generator().manual_seed(tokens))
            for i in layers:
                diffs[(i, tokens)] = (sharded.layers[i].moe(x.clone()) - whole.layers[i].moe(x)).abs().max().item()
        ids = torch.randint(0, whole.cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(7))
        out[folder] = dict(
            moe_layers=layers, diffs=diffs,
            rows=[sharded.layers[i].moe.experts.intermediate_size for i in layers],
            whole_rows=[whole.layers[i].moe.experts.intermediate_size for i in layers],
            logits=prefill_logits(sharded, ids.tolist()), whole_logits=prefill_logits(whole, ids.tolist()),
        )
    return out
