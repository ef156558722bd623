"""Per-request sampling parameters, with vLLM's names and defaults.

`SamplingParams(...)` normalises and validates its fields on construction; anything out of range or
of the wrong type raises `InvalidRequestError` (a ValueError) naming the field, so the API layer
can turn it into a 400 response as is. Checks that need the model (token ids against the
vocabulary) are in `validate_for_vocab`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pyserve.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
# The detokenizer holds every proper prefix of a stop string (quadratic in its length): 16 stop strings of
# 100k characters, a 1.6 MB body, would take some 80 GB.
MAX_STOP_CHARS = 1024
MAX_N = 128  # OpenAI's limit; every sample is a sequence the engine builds in one go
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_GREEDY_EPS = 1e-5


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(name: str, v: Any) -> int:
    """An integer (not a bool) that fits in a signed 64-bit integer, as every count, id and seed
    must to reach the kernels (`torch.tensor` raises on anything larger)."""
    if not _is_int(v):
        raise InvalidRequestError(name, f"{name} must be an integer, got {v!r}")
    if not INT64_MIN <= v <= INT64_MAX:
        raise InvalidRequestError(name, f"{name} must be a signed 64-bit integer, in [{INT64_MIN}, {INT64_MAX}], "
                                        f"got {v}")
    return v


def _opt_int(name: str, v: Any) -> int | None:
    return None if v is None else _int(name, v)


def _float(name: str, v: Any) -> float:
    """A real number (ints accepted, bools and strings not), NaN and infinities rejected."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRequestError(name, f"{name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise InvalidRequestError(name, f"{name} must be finite, got {v}")
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise InvalidRequestError(name, f"{name} must be a boolean, got {v!r}")
    return v


def _in_range(name: str, v: float, lo: float, hi: float) -> None:
    if not lo <= v <= hi:
        raise InvalidRequestError(name.split("[")[0], f"{name} must be in [{lo:g}, {hi:g}], got {v:g}")


def _stop_list(v: Any) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, (list, tuple)):
        raise InvalidRequestError("stop", f"stop must be a string or a list of strings, got {v!r}")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", f"stop must have at most {MAX_STOP_STRINGS} strings, "
                                          f"got {len(stops)}")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidRequestError("stop", f"stop strings must be non-empty strings, got {s!r}")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidRequestError("stop", f"stop strings must be at most {MAX_STOP_CHARS} characters, "
                                              f"got one of {len(s)}")
    return list(stops)


def _token_id_list(name: str, v: Any) -> list[int]:
    if v is None:
        return []
    if not isinstance(v, (list, tuple)):
        raise InvalidRequestError(name, f"{name} must be a list of token ids, got {v!r}")
    return [_int(name, t) for t in v]


def _logit_bias(v: Any) -> dict[int, float] | None:
    """Token id -> bias; string keys (as OpenAI's JSON sends them) are converted to ints."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise InvalidRequestError("logit_bias", f"logit_bias must be a mapping of token id to bias, got {v!r}")
    out: dict[int, float] = {}
    for key, bias in v.items():
        if isinstance(key, str):
            try:
                key = int(key.strip())
            except ValueError:
                raise InvalidRequestError("logit_bias", f"logit_bias keys must be token ids, got {key!r}") from None
        elif not _is_int(key):
            raise InvalidRequestError("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
        bias = _float("logit_bias", bias)
        _in_range(f"logit_bias[{key}]", bias, -100.0, 100.0)
        out[key] = bias
    return out


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, normalised to 0) = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: str | list[str] | None = None  # normalised to a list
    stop_token_ids: list[int] | None = None  # normalised to a list
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = until the context limit
    min_tokens: int = 0
    logprobs: int | None = None  # top-N log-probabilities per generated token
    prompt_logprobs: int | None = None  # top-N (plus the actual token) per prompt position
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens; -1: max_model_len
    # Structured outputs: a pyserve.structured.GrammarSpec every sample's tokens must follow; with
    # structured_outputs_after, only once that token (a reasoning model's end of thinking) has been generated.
    structured_outputs: Any = None
    structured_outputs_after: int | None = None

    def __post_init__(self) -> None:
        self.n = _int("n", self.n)
        _in_range("n", self.n, 1, MAX_N)

        self.temperature = _float("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequestError("temperature", f"temperature must be >= 0, got {self.temperature:g}")

        self.top_p = _float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p", f"top_p must be in (0, 1], got {self.top_p}")

        self.top_k = _int("top_k", self.top_k)
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"top_k must be >= 0 (or -1 for off), got {self.top_k}")

        self.min_p = _float("min_p", self.min_p)
        _in_range("min_p", self.min_p, 0.0, 1.0)

        self.seed = _opt_int("seed", self.seed)

        self.presence_penalty = _float("presence_penalty", self.presence_penalty)
        _in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty)
        _in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidRequestError("repetition_penalty",
                                      f"repetition_penalty must be > 0, got {self.repetition_penalty}")

        self.logit_bias = _logit_bias(self.logit_bias)
        self.stop = _stop_list(self.stop)
        self.stop_token_ids = _token_id_list("stop_token_ids", self.stop_token_ids)
        self.ignore_eos = _bool("ignore_eos", self.ignore_eos)

        self.max_tokens = _opt_int("max_tokens", self.max_tokens)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        self.min_tokens = _int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise InvalidRequestError("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens", f"min_tokens must be <= max_tokens ({self.max_tokens}), "
                                                    f"got {self.min_tokens}")

        self.logprobs = _opt_int("logprobs", self.logprobs)
        if self.logprobs is not None:
            _in_range("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        self.prompt_logprobs = _opt_int("prompt_logprobs", self.prompt_logprobs)
        if self.prompt_logprobs is not None:
            _in_range("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        self.truncate_prompt_tokens = _opt_int("truncate_prompt_tokens", self.truncate_prompt_tokens)
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1 \
                and self.truncate_prompt_tokens != -1:
            raise InvalidRequestError("truncate_prompt_tokens", "truncate_prompt_tokens must be >= 1 (or -1 for the "
                                      "maximum context length), "
                             f"got {self.truncate_prompt_tokens}")

        if self.structured_outputs is not None:
            from pyserve.structured.spec import GrammarSpec

            if not isinstance(self.structured_outputs, GrammarSpec):
                raise InvalidRequestError("structured_outputs", "structured_outputs must be a GrammarSpec, got "
                                                                f"{type(self.structured_outputs).__name__}")
        self.structured_outputs_after = _opt_int("structured_outputs_after", self.structured_outputs_after)

        self.skip_special_tokens = _bool("skip_special_tokens", self.skip_special_tokens)
        self.include_stop_str_in_output = _bool("include_stop_str_in_output", self.include_stop_str_in_output)

    @property
    def greedy(self) -> bool:
        """Temperature ~0: take the argmax, no randomness."""
        return self.temperature < _GREEDY_EPS

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Token ids in logit_bias and stop_token_ids must lie in [0, vocab_size)."""
        after = [] if self.structured_outputs_after is None else [self.structured_outputs_after]
        for name, ids in (("logit_bias", self.logit_bias or {}), ("stop_token_ids", self.stop_token_ids or []),
                          ("structured_outputs_after", after)):
            for t in ids:
                if not 0 <= t < vocab_size:
                    raise InvalidRequestError(name, f"{name} token id {t} is out of range [0, {vocab_size})")
