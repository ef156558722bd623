"""What the engine returns for a request: cumulative text and tokens per
sample, plus the delta since the previous output (for streaming)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """A prompt token's log-probability under the model (vLLM's shape), and its rank among the
    vocabulary (1 = the most likely)."""

    logprob: float
    rank: int


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[float] | None = None  # of each generated token (raw model distribution)
    top_logprobs: list[dict[int, float]] | None = None  # per token, when logprobs=N was asked
    # Since this request's previous output: what a stream sends next.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[float] = field(default_factory=list)
    delta_top_logprobs: list[dict[int, float]] | None = None  # when logprobs=N was asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # With SamplingParams.prompt_logprobs: per prompt position, token id -> Logprob for the actual token
    # and the top N; None for the first token (nothing precedes it). Complete once the prompt is computed.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Set when the request failed in the engine (finish_reason "error"): what went wrong. Other requests
    # are unaffected.
    error: str | None = None
    error_param: str | None = None  # the request field at fault, when the request was (its grammar)
