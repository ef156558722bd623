"""Turns a scheduled batch into tensors, runs the model and samples one token
for every sequence whose step reaches the end of its known tokens; for a
sequence that asked for prompt logprobs, also scores the prompt tokens its
chunk covers.

What a step builds from a request's own values (its sampling parameters) is
isolated per sequence: if building it fails, only that sequence is reported
in `StepResult.failed` and the others run. The forward pass and the sampling
kernel see the whole batch; a failure there is the engine's, not a request's."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pyserve import _ops
from pyserve.engine.scheduler import ScheduledBatch
from pyserve.engine.sequence import Sequence
from pyserve.models import AttentionMetadata, LlamaModel
from pyserve.outputs import Logprob

# Prompt positions whose log-softmax is taken at once: bounds the [rows, vocab] temporaries.
_PROMPT_LOGPROB_SLICE = 128


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None


@dataclass
class StepResult:
    sampled: list[SampledToken] = field(default_factory=list)
    failed: list[tuple[Sequence, BaseException]] = field(default_factory=list)


@dataclass
class _SamplingInputs:
    tensors: tuple  # the sample op's per-row arguments, in its order
    num_top: int
    allowed_mask: torch.Tensor | None = None  # [rows, words] int32: structured outputs' allowed tokens


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, eos_token_ids: tuple[int, ...],
                 kv_cache_dtype: torch.dtype | None = None):
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size, kv_cache_dtype)
        self.eos_token_ids = eos_token_ids
        self.grammar_backend = None  # set by the engine with the first structured-output request
        self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyserve-grammar")
        self.grammar_mask_seconds = 0.0

    def execute(self, batch: ScheduledBatch) -> StepResult:
        result = StepResult()
        if batch.copies:
            self.model.copy_blocks(self.kv_caches, torch.tensor(batch.copies, dtype=torch.int64, device=self.device))

        ids: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []  # (seq, first row, first position, count)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            ids += seq.tokens(seq.num_computed, seq.num_computed + n)
            if seq.prompt_logprobs is not None:
                # Position p's logits score prompt token p + 1; the last prompt position's are sampled.
                first = max(seq.num_computed, len(seq.prompt_logprobs) - 1)
                last = min(seq.num_computed + n, len(seq.prompt_ids) - 1)
                if first < last:
                    prompt_rows.append((seq, qsl[-1] + first - seq.num_computed, first, last - first))
            qsl.append(qsl[-1] + n)
            seq_lens.append(seq.num_computed + n)
            if seq.num_computed + n == seq.num_tokens:
                sample_rows.append(qsl[-1] - 1)
                sample_seqs.append(seq)
        width = max(len(s.block_ids) for s in batch.seqs)
        tables = [s.block_ids + [0] * (width - len(s.block_ids)) for s in batch.seqs]

        sampling = None
        if sample_seqs:
            sampling, sample_seqs, sample_rows = self._isolated_sampling_inputs(sample_seqs, sample_rows, result)
        failed = {id(s) for s, _ in result.failed}
        prompt_rows = [r for r in prompt_rows if id(r[0]) not in failed]

        dev = self.device
        block_tables = torch.tensor(tables, dtype=torch.int32, device=dev)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        qsl_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
        slots, positions = _ops.compute_slot_mapping(block_tables, seq_lens_t, qsl_t, self.block_size, len(ids))
        meta = AttentionMetadata(slots, block_tables, seq_lens_t, qsl_t, max(seq_lens))
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        rows = sample_rows + [r for _, start, _, count in prompt_rows for r in range(start, start + count)]
        # Grammar masks fill on another thread while the model runs (llguidance releases the GIL).
        masks = self._mask_pool.submit(self._allowed_mask, sample_seqs) if any(
            s.constrained for s in sample_seqs) else None
        logits = self.model.forward(input_ids, positions, self.kv_caches, meta,
                                    torch.tensor(rows, dtype=torch.long, device=dev))
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed += n
        offset = len(sample_rows)
        for seq, _, first, count in prompt_rows:
            try:
                seq.prompt_logprobs += _prompt_logprobs(logits[offset: offset + count],
                                                        seq.prompt_ids[first + 1: first + 1 + count],
                                                        seq.params.prompt_logprobs)
            except Exception as e:  # noqa: BLE001 - this request's, reported by the engine
                result.failed.append((seq, e))
            offset += count
        if masks is not None:
            sampling.allowed_mask = masks.result()
            for s in sample_seqs:
                if s.constrained:
                    try:
                        s.grammar.check()
                    except Exception as e:  # noqa: BLE001 - this request's grammar; its token is dropped
                        result.failed.append((s, e))
        if sample_seqs:
            result.sampled = self._sample(logits[: len(sample_rows)], sample_seqs, sampling)
        return result

    def _isolated_sampling_inputs(self, seqs: list[Sequence], rows: list[int], result: StepResult):
        """The sampling inputs of every sequence that can build its own; those that cannot go to
        result.failed (built one by one only once the whole batch has failed, so it costs nothing
        otherwise)."""
        try:
            return self._sampling_inputs(seqs), seqs, rows
        except Exception:  # noqa: BLE001 - find whose it is
            pass
        kept_seqs, kept_rows = [], []
        for seq, row in zip(seqs, rows):
            try:
                self._sampling_inputs([seq])
            except Exception as e:  # noqa: BLE001
                result.failed.append((seq, e))
                continue
            kept_seqs.append(seq)
            kept_rows.append(row)
        if not kept_seqs:
            return None, [], []
        return self._sampling_inputs(kept_seqs), kept_seqs, kept_rows

    def _sampling_inputs(self, seqs: list[Sequence]) -> _SamplingInputs:
        dev = self.device
        params = [s.params for s in seqs]
        vocab = self.model.cfg.vocab_size

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

        return _SamplingInputs((
            row([p.temperature for p in params], torch.float32),
            row([min(p.top_k, vocab) for p in params], torch.int32),  # k >= vocab is "off" (SAMPLING.md)
            row([p.top_p for p in params], torch.float32),
            row([p.min_p for p in params], torch.float32),
            row([s.seed for s in seqs], torch.int64),
            row([len(s.output_ids) for s in seqs], torch.int64),
            row([p.repetition_penalty for p in params], torch.float32),
            row([p.presence_penalty for p in params], torch.float32),
            row([p.frequency_penalty for p in params], torch.float32),
            prompt_ids, output_ids, bias_ids, bias_values,
        ), max((p.logprobs or 0) for p in params))

    def _allowed_mask(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """The grammar rows' allowed tokens (all bits set for rows without a grammar), or None."""
        rows = [(s.grammar, i) for i, s in enumerate(seqs) if s.constrained]
        if not rows:
            return None
        start = time.perf_counter()
        mask = self.grammar_backend.allocate_bitmask(len(seqs))
        self.grammar_backend.fill_bitmasks([(g.matcher, i) for g, i in rows], mask)  # in parallel, GIL released
        self.grammar_mask_seconds += time.perf_counter() - start
        return mask.to(self.device)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], inputs: _SamplingInputs) -> list[SampledToken]:
        result = _ops.sample(logits, *inputs.tensors, inputs.num_top, inputs.allowed_mask)
        tokens = result.token_ids.tolist()
        logprobs = result.logprobs.tolist()
        top_ids = result.top_ids.tolist() if inputs.num_top else None
        top_lps = result.top_logprobs.tolist() if inputs.num_top else None
        out = []
        for i, s in enumerate(seqs):
            top = None
            if s.params.logprobs is not None:
                n = s.params.logprobs
                top = dict(zip(top_ids[i][:n], top_lps[i][:n])) if n else {}
            out.append(SampledToken(s, tokens[i], logprobs[i], top))
        return out


def _prompt_logprobs(logits: torch.Tensor, targets: list[int], num_top: int) -> list[dict[int, Logprob]]:
    """Per row: the actual next token's log-probability and rank (1 = the most likely), plus the
    num_top most likely tokens (vLLM's prompt_logprobs), from the raw logits as sampled logprobs are."""
    out: list[dict[int, Logprob]] = []
    target_t = torch.tensor(targets, dtype=torch.long, device=logits.device)
    for s in range(0, len(targets), _PROMPT_LOGPROB_SLICE):
        lp = torch.log_softmax(logits[s: s + _PROMPT_LOGPROB_SLICE].float(), dim=-1)
        tgt = target_t[s: s + _PROMPT_LOGPROB_SLICE]
        actual = lp.gather(1, tgt[:, None])
        ranks = (lp > actual).sum(dim=1) + 1
        top_v, top_i = lp.topk(num_top, dim=1) if num_top else (None, None)
        actual_l, ranks_l, tgt_l = actual[:, 0].tolist(), ranks.tolist(), tgt.tolist()
        top_vl = top_v.tolist() if num_top else None
        top_il = top_i.tolist() if num_top else None
        for r in range(len(tgt_l)):
            d: dict[int, Logprob] = {}
            if num_top:
                for rank, (tid, v) in enumerate(zip(top_il[r], top_vl[r]), start=1):
                    d[tid] = Logprob(v, rank)
            d[tgt_l[r]] = Logprob(actual_l[r], ranks_l[r])
            out.append(d)
    return out


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    t = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            t[i, : len(r)] = torch.tensor(r)
    return t.to(device)
