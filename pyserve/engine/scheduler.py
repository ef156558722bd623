"""Which tokens run in the next step (vLLM v1 style: no prefill/decode phases).

Every step has a token budget. Running sequences go first, in admission
order, each taking what it still needs (1 token for a decode, the rest of its
prompt for a prefill, capped by the budget, so long prompts are split into
chunks while decodes keep flowing). Then waiting sequences are admitted while
budget, `max_num_seqs` and free blocks allow. When blocks run out, the most
recently admitted running sequence is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed later.

A sequence scoring its prompt (prompt_logprobs) takes at most
PROMPT_LOGPROBS_CHUNK prompt tokens a step: each needs a row of logits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pyserve.engine.block_manager import BlockManager
from pyserve.engine.sequence import Sequence, SequenceStatus

# Prompt tokens a step may score for one sequence with prompt_logprobs (a [tokens, vocab] fp32 logits block).
PROMPT_LOGPROBS_CHUNK = 256


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # new tokens of each sequence this step
    copies: list[tuple[int, int]]  # (src, dst) KV blocks to copy before the step

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> int:
        n = min(seq.num_tokens - seq.num_computed, budget)
        if seq.needs_prompt_logprobs:
            n = min(n, PROMPT_LOGPROBS_CHUNK)
        return n

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted below, earlier in this loop
                continue
            n = self._chunk(seq, budget)
            if n <= 0:
                continue
            while not self.blocks.ensure_slots(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                seqs.append(seq)
                counts.append(n)
                budget -= n

        # Admitting while preempting would only thrash.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.fork_from is not None and not seq.admitted:
                parent = seq.fork_from
                if parent.finished or parent.num_computed < len(parent.prompt_ids):
                    if parent.finished or parent.status is SequenceStatus.WAITING:
                        seq.fork_from = None  # parent gone or preempted: compute on its own
                    else:
                        break  # wait for the parent's prompt, keeping FCFS order
            if not seq.admitted:
                self.blocks.admit(seq)
            n = self._chunk(seq, budget)
            if not self.blocks.ensure_slots(seq, n):
                # A waiting sequence holds no blocks: kept, the prefix blocks its admission took could be
                # exactly what the sequence preempted in front of it needs, with nothing running to free
                # any (the engine then stalled for good: found by bench/soak.py with a small cache).
                self.blocks.release(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n

        return ScheduledBatch(seqs, counts, self.blocks.take_pending_copies())

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
