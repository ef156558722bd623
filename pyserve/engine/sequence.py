"""One generated sample of a request: its tokens, its KV blocks and where it
stands in the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pyserve.engine.sequence_grammar import SequenceGrammar
from pyserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # this sample's sampling stream; steps are len(output_ids)
    arrival: int  # admission order among requests (FCFS)
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of this sequence's full blocks, in order
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache
    prefix_hit_tokens: int = 0  # prompt tokens found in the prefix cache at the last admission
    admitted: bool = False  # has looked up the prefix cache since it last (re)entered the waiting queue
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)
    # SamplingParams.prompt_logprobs (first sample only): filled a chunk at a time, [None] + one per position.
    prompt_logprobs: list | None = None
    # n > 1: siblings wait for the first sample's prompt and fork its blocks.
    fork_from: "Sequence | None" = None
    # Structured outputs: the grammar that masks this sample's tokens (pyserve/engine/sequence_grammar.py).
    grammar: "SequenceGrammar | None" = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[i] if i < p else self.output_ids[i - p]

    def tokens(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt positions still to score: they must be computed, not taken from the prefix cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def constrained(self) -> bool:
        """A grammar masks this sequence's next token."""
        return self.grammar is not None and self.grammar.active

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
