"""Turns a scheduled batch into tensors, runs the model and samples one token
for every sequence whose step reaches the end of its known tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyserve import _ops
from pyserve.engine.scheduler import ScheduledBatch
from pyserve.engine.sequence import Sequence
from pyserve.models import AttentionMetadata, LlamaModel


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, eos_token_ids: tuple[int, ...]):
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        self.eos_token_ids = eos_token_ids

    def execute(self, batch: ScheduledBatch) -> list[SampledToken]:
        if batch.copies:
            mapping = torch.tensor(batch.copies, dtype=torch.int64, device=self.device)
            for key_cache, value_cache in self.kv_caches:
                _ops.copy_blocks(key_cache, value_cache, mapping)

        ids: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            ids += seq.tokens(seq.num_computed, seq.num_computed + n)
            qsl.append(qsl[-1] + n)
            seq_lens.append(seq.num_computed + n)
            if seq.num_computed + n == seq.num_tokens:
                sample_rows.append(qsl[-1] - 1)
                sample_seqs.append(seq)
        width = max(len(s.block_ids) for s in batch.seqs)
        tables = [s.block_ids + [0] * (width - len(s.block_ids)) for s in batch.seqs]

        dev = self.device
        block_tables = torch.tensor(tables, dtype=torch.int32, device=dev)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        qsl_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
        slots, positions = _ops.compute_slot_mapping(block_tables, seq_lens_t, qsl_t, self.block_size, len(ids))
        meta = AttentionMetadata(slots, block_tables, seq_lens_t, qsl_t, max(seq_lens))
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        logits_rows = torch.tensor(sample_rows, dtype=torch.long, device=dev)
        logits = self.model.forward(input_ids, positions, self.kv_caches, meta, logits_rows)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed += n
        if not sample_seqs:
            return []
        return self.sample(logits, sample_seqs)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        dev = logits.device
        params = [s.params for s in seqs]

        def row(values, dtype):
            return torch.tensor(values, dtype=dtype, device=dev)

        penalties = any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params)
        prompt_ids = output_ids = None
        if penalties:
            prompt_ids = _padded([s.prompt_ids for s in seqs], dev)
            output_ids = _padded([s.output_ids for s in seqs], dev)

        # Logit bias, plus the bans of min_tokens: no EOS / stop token before it.
        bias = []
        for s in seqs:
            entries = dict(s.params.logit_bias or {})
            if len(s.output_ids) < s.params.min_tokens:
                banned = list(s.params.stop_token_ids or [])
                if not s.params.ignore_eos:
                    banned += list(self.eos_token_ids)
                for t in banned:
                    entries[t] = float("-inf")
            bias.append(entries)
        bias_ids = bias_values = None
        if any(bias):
            width = max(len(b) for b in bias)
            bias_ids = torch.full((len(seqs), width), -1, dtype=torch.int64)
            bias_values = torch.zeros((len(seqs), width), dtype=torch.float32)
            for i, b in enumerate(bias):
                if b:
                    bias_ids[i, : len(b)] = torch.tensor(list(b.keys()))
                    bias_values[i, : len(b)] = torch.tensor(list(b.values()))
            bias_ids, bias_values = bias_ids.to(dev), bias_values.to(dev)

        num_top = max((p.logprobs or 0) for p in params)
        result = _ops.sample(
            logits,
            row([p.temperature for p in params], torch.float32),
            row([p.top_k for p in params], torch.int32),
            row([p.top_p for p in params], torch.float32),
            row([p.min_p for p in params], torch.float32),
            row([s.seed for s in seqs], torch.int64),
            row([len(s.output_ids) for s in seqs], torch.int64),
            row([p.repetition_penalty for p in params], torch.float32),
            row([p.presence_penalty for p in params], torch.float32),
            row([p.frequency_penalty for p in params], torch.float32),
            prompt_ids, output_ids, bias_ids, bias_values, num_top,
        )
        tokens = result.token_ids.tolist()
        logprobs = result.logprobs.tolist()
        top_ids = result.top_ids.tolist() if num_top else None
        top_lps = result.top_logprobs.tolist() if num_top else None
        out = []
        for i, s in enumerate(seqs):
            top = None
            if s.params.logprobs is not None:
                n = s.params.logprobs
                top = dict(zip(top_ids[i][:n], top_lps[i][:n])) if n else {}
            out.append(SampledToken(s, tokens[i], logprobs[i], top))
        return out


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    t = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            t[i, : len(r)] = torch.tensor(r)
    return t.to(device)
