"""Log-probabilities in the API's shapes: the legacy completions object (OpenAI's `logprobs`, with
the echoed prompt's tokens in front when `echo` is set), chat's `logprobs.content`, and vLLM's
`prompt_logprobs`. Each response decodes a token id once (TokenText)."""

from __future__ import annotations

from pyserve.outputs import Logprob

# What OpenAI (and vLLM) send for a log-probability of -inf, which JSON cannot carry.
_FLOOR = -9999.0


class TokenText:
    """Token id -> its text on its own, memoised for one response."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._cache[token_id] = self._tok.decode([token_id])
        return s


def _lp(v: float) -> float:
    return max(v, _FLOOR)


def completion_logprobs(text: TokenText, ids: list[int], lps: list[float], tops: list[dict[int, float]] | None,
                        offset: int, prompt: tuple[list[int], list] | None = None) -> dict:
    """OpenAI's legacy object for generated tokens ids (their logprobs lps, top-N dicts tops), text offsets
    from `offset`. Each top_logprobs entry holds the top N and the sampled token (N + 1 entries at most, as
    OpenAI documents; logprobs=0 gives the sampled token alone). prompt: (ids, prompt_logprobs) to put
    in front (echo): the first prompt token has no logprob (None), like OpenAI's."""
    tokens, token_lps, top, offsets = [], [], [], []
    if prompt is not None:
        for tid, entry in zip(*prompt):
            tokens.append(text(tid))
            token_lps.append(None if entry is None else _lp(entry[tid].logprob))
            top.append(None if entry is None else
                       _by_logprob(text, {t: lp.logprob for t, lp in entry.items()}))
    for k, (tid, lp) in enumerate(zip(ids, lps)):
        tokens.append(text(tid))
        token_lps.append(_lp(lp))
        if tops is not None:
            top.append(_by_logprob(text, {**tops[k], tid: lp}))
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": top if tops is not None else None,
            "text_offset": offsets}


def _by_logprob(text: TokenText, d: dict[int, float]) -> dict[str, float]:
    return {text(t): _lp(v) for t, v in sorted(d.items(), key=lambda kv: -kv[1])}


def chat_logprobs(text: TokenText, ids: list[int], lps: list[float], tops: list[dict[int, float]] | None) -> dict:
    """Chat's `logprobs.content`: per token its logprob and the top N (exactly N, as OpenAI's)."""
    content = []
    for k, (t, lp) in enumerate(zip(ids, lps)):
        s = text(t)
        entry = {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8")), "top_logprobs": []}
        if tops is not None and k < len(tops):
            for tid, tlp in sorted(tops[k].items(), key=lambda kv: -kv[1]):
                ts = text(tid)
                entry["top_logprobs"].append({"token": ts, "logprob": _lp(tlp), "bytes": list(ts.encode("utf-8"))})
        content.append(entry)
    return {"content": content}


def prompt_logprobs(text: TokenText, entries: list[dict[int, Logprob] | None]) -> list:
    """vLLM's `prompt_logprobs`: per prompt position None (the first) or {token id: {logprob, rank,
    decoded_token}} for the actual token and the top N."""
    return [None if e is None else
            {str(t): {"logprob": _lp(lp.logprob), "rank": lp.rank, "decoded_token": text(t)} for t, lp in e.items()}
            for e in entries]
