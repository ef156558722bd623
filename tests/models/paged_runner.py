"""A minimal greedy driver of the paged forward path, for model tests: it
staggers sequences so that every step mixes prefill chunks and decodes, the
way the engine's scheduler will."""

from __future__ import annotations

import math

import torch

from pyserve import _ops
from pyserve.models import AttentionMetadata, LlamaModel


class PagedRunner:
    def __init__(self, model: LlamaModel, block_size: int = 16, num_blocks: int = 256,
                 kv_cache_dtype: torch.dtype | None = None):
        self.model = model
        self.block_size = block_size
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size, kv_cache_dtype)
        # Hand out blocks in a scrambled order so no sequence's blocks are contiguous.
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()

    def generate(self, prompts: list[list[int]], max_new_tokens: int, chunk_size: int = 7,
                 start_every: int = 2) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy continuation of each prompt. Sequence i joins at step
        i * start_every and prefills chunk_size tokens per step. Returns the new
        tokens and, per sequence, the logits of its first generated token."""
        dev = self.model.device
        tokens = [list(p) for p in prompts]
        computed = [0] * len(prompts)
        blocks: list[list[int]] = [[] for _ in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        first_logits: list[torch.Tensor | None] = [None] * len(prompts)
        step = 0
        while any(len(n) < max_new_tokens for n in new):
            batch = [i for i in range(len(prompts)) if step >= i * start_every and len(new[i]) < max_new_tokens]
            step += 1
            if not batch:
                continue
            ids, qsl, seq_lens, tables, want = [], [0], [], [], []
            for i in batch:
                n = min(chunk_size, len(tokens[i]) - computed[i])
                ids += tokens[i][computed[i] : computed[i] + n]
                computed[i] += n
                need = math.ceil(computed[i] / self.block_size)
                while len(blocks[i]) < need:
                    blocks[i].append(self.free.pop())
                qsl.append(qsl[-1] + n)
                seq_lens.append(computed[i])
                tables.append(blocks[i])
                if computed[i] == len(tokens[i]):
                    want.append((i, len(qsl) - 2))
            width = max(len(t) for t in tables)
            block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
            seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
            qsl_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
            # Two padding rows at the end, as a CUDA-graph-padded batch would have.
            num_tokens = len(ids) + 2
            slots, positions = _ops.compute_slot_mapping(block_tables, seq_lens_t, qsl_t, self.block_size, num_tokens)
            meta = AttentionMetadata(slots, block_tables, seq_lens_t, qsl_t, max(seq_lens))
            input_ids = torch.tensor(ids + [0, 0], dtype=torch.long, device=dev)
            logits_rows = torch.tensor([qsl[j + 1] - 1 for _, j in want], dtype=torch.long, device=dev)
            logits = self.model.forward(input_ids, positions, self.kv_caches, meta, logits_rows)
            for (i, _), row in zip(want, logits):
                if first_logits[i] is None:
                    first_logits[i] = row.cpu()
                tok = int(row.argmax())
                new[i].append(tok)
                tokens[i].append(tok)
        for b in blocks:
            self.free += b
        return new, first_logits
