"""GPU memory sizing: how much a forward pass at the largest batch needs on
top of the weights, so the KV cache can take the rest."""

from __future__ import annotations

import torch

from pyserve.models import AttentionMetadata, LlamaModel


def profile_forward_peak(model: LlamaModel, num_tokens: int, block_size: int) -> int:
    """Bytes of peak activation memory of one forward over num_tokens tokens
    (one sequence, all logits rows: the worst case the runner can schedule)."""
    dev = model.device
    n = min(num_tokens, model.rotary.max_positions)
    blocks = -(-n // block_size)
    kv = model.allocate_kv_cache(blocks, block_size)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    ids = torch.zeros(n, dtype=torch.long, device=dev)
    positions = torch.arange(n, device=dev)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=dev),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
        max_seq_len=n,
    )
    model.forward(ids, positions, kv, meta, torch.arange(n, device=dev))
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    del kv
    torch.cuda.empty_cache()
    return int(peak)
