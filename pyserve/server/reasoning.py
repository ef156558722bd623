"""Reasoning parsers: split a thinking model's output into ``reasoning`` and ``content`` (vLLM's
``--reasoning-parser``; OpenAI-compatible servers send the first as ``message.reasoning_content`` /
``delta.reasoning_content``, vLLM >= 0.10 also as ``reasoning``).

Both parsers here read ``<think>...</think>``:

* ``deepseek_r1`` -- DeepSeek-R1 (and its distills). Its chat template ends the prompt with ``<think>\\n``,
  so the output starts inside the thinking and only ``</think>`` appears; a ``<think>`` the model writes
  itself at the very start is dropped. No ``</think>`` at all: everything is reasoning (vLLM).
* ``qwen3`` -- Qwen3 / QwQ / Qwen3.5. Qwen3 (2504) writes ``<think>...</think>`` itself when thinking is on
  and gets an empty ``<think>\\n\\n</think>\\n\\n`` in the prompt when ``enable_thinking=False``; the
  2507 "Thinking" models and Qwen3.5 have ``<think>\\n`` in the prompt, like R1. A ``<tool_call>`` inside
  the thinking also ends it (the tag stays, as content, for the tool parser) -- Qwen3.5 does that (vLLM).

Where the output starts -- inside the thinking or not -- is the one thing a stream cannot see, so it is a
parameter, ``start_in_reasoning``; the server should compute it with ``prompt_starts_in_reasoning(prompt)``
(does the rendered prompt end with an open ``<think>``). Left as None it is each parser's default: True
for deepseek_r1 (vLLM), for qwen3 ``enable_thinking`` from ``chat_template_kwargs`` (default True, as vLLM
now). When the output does not start inside the thinking, a ``<think>`` at its start (after optional
whitespace) opens it; anything else is content.

``split(text)`` runs the same state machine as the stream, so for every way of splitting the text into
deltas the concatenated reasoning and content deltas equal ``split``'s ("" streamed <=> None).

Differences from vLLM, deliberate: an empty reasoning is None (vLLM's R1 non-streaming gives ""); only a
``<think>`` at the start is removed (vLLM removes the first anywhere, taking the text before it with it);
qwen3 without ``</think>`` follows the newer vLLM (reasoning while thinking is on) rather than the older
one that turned the whole text into content -- the older rule cannot be streamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ReasoningParser", "ReasoningStream", "ReasoningTokens", "REASONING_PARSERS",
           "get_reasoning_parser", "find_token_id"]

_WS = " \t\n\r"
_START, _REASONING, _CONTENT = range(3)


def _partial_suffix(buf: str, tags: Sequence[str]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of one of ``tags``."""
    best = 0
    for tag in tags:
        for k in range(min(len(buf), len(tag) - 1), best, -1):
            if buf.endswith(tag[:k]):
                best = k
                break
    return best


class ReasoningStream:
    """Per-choice state. ``feed(delta)`` and ``finish()`` return ``(reasoning_delta, content_delta)``,
    each None when empty. ``reasoning_ended`` turns True once the output is known to be past the
    thinking (or never to have had one), which is when a JSON grammar may start to apply."""

    def __init__(self, start_tag: str, end_tag: str, implicit_end_tags: tuple[str, ...],
                 start_in_reasoning: bool):
        self.start_tag = start_tag
        self.end_tag = end_tag
        self.implicit_end_tags = implicit_end_tags
        self.start_in_reasoning = start_in_reasoning
        self.reasoning_ended = False
        self._mode = _START
        self._buf = ""
        self._finished = False

    def feed(self, delta: str) -> tuple[str | None, str | None]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        r: list[str] = []
        c: list[str] = []
        buf = self._buf + delta
        self._buf = ""
        while buf:
            if self._mode == _START:
                # The start: "<think>" (after whitespace) opens the thinking and is dropped; otherwise the
                # output is reasoning (start_in_reasoning) or content.
                rest = buf.lstrip(_WS)
                if not rest or (self.start_tag.startswith(rest) and rest != self.start_tag):
                    self._buf = buf
                    break
                if rest.startswith(self.start_tag):
                    buf = rest[len(self.start_tag):]
                    self._mode = _REASONING
                elif self.start_in_reasoning:
                    self._mode = _REASONING
                else:
                    self._mode = _CONTENT
                    self.reasoning_ended = True
            elif self._mode == _REASONING:
                k, tag = -1, ""
                for t in (self.end_tag, *self.implicit_end_tags):
                    j = buf.find(t)
                    if j >= 0 and (k < 0 or j < k):
                        k, tag = j, t
                if k < 0:
                    hold = _partial_suffix(buf, (self.end_tag, *self.implicit_end_tags))
                    r.append(buf[:len(buf) - hold])
                    self._buf = buf[len(buf) - hold:]
                    break
                r.append(buf[:k])
                # "</think>" is dropped; an implicit end (e.g. "<tool_call>") stays, as content
                buf = buf[k + len(tag):] if tag == self.end_tag else buf[k:]
                self._mode = _CONTENT
                self.reasoning_ended = True
            else:
                c.append(buf)
                break
        return ("".join(r) or None), ("".join(c) or None)

    def finish(self) -> tuple[str | None, str | None]:
        """End of output: whatever was held back (a partial tag) goes where it stands."""
        if self._finished:
            return None, None
        self._finished = True
        buf, self._buf = self._buf, ""
        if not buf:
            return None, None
        if self._mode == _REASONING or (self._mode == _START and self.start_in_reasoning):
            return buf, None
        return None, buf


class ReasoningParser:
    """Stateless; ``streamer()`` makes the per-choice state."""

    def __init__(self, name: str, start_tag: str = "<think>", end_tag: str = "</think>",
                 implicit_end_tags: tuple[str, ...] = (), default_start_in_reasoning: bool = True,
                 follows_enable_thinking: bool = False):
        self.name = name
        self.start_tag = start_tag
        self.end_tag = end_tag
        self.implicit_end_tags = implicit_end_tags
        self.default_start_in_reasoning = default_start_in_reasoning
        self.follows_enable_thinking = follows_enable_thinking

    # -- where the output starts
    def prompt_starts_in_reasoning(self, prompt: str) -> bool:
        """Whether the rendered prompt leaves the model inside an open thinking block (the template ended
        it with ``<think>`` and optional whitespace), so the output begins as reasoning."""
        return prompt.rstrip().endswith(self.start_tag)

    def resolve_start(self, start_in_reasoning: bool | None = None, prompt: str | None = None,
                      chat_template_kwargs: dict[str, Any] | None = None) -> bool:
        """``start_in_reasoning`` if given; else from the prompt if given (an open ``<think>`` at its end);
        else the parser's default (qwen3: ``enable_thinking``, default True). Without ``<think>`` in the
        prompt, an output that opens with its own ``<think>`` (Qwen3's way) is read as thinking."""
        if start_in_reasoning is not None:
            return start_in_reasoning
        if prompt is not None:
            return self.prompt_starts_in_reasoning(prompt)
        if self.follows_enable_thinking and chat_template_kwargs:
            return bool(chat_template_kwargs.get("enable_thinking", self.default_start_in_reasoning))
        return self.default_start_in_reasoning

    # -- text
    def streamer(self, start_in_reasoning: bool | None = None, prompt: str | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None) -> ReasoningStream:
        return ReasoningStream(self.start_tag, self.end_tag, self.implicit_end_tags,
                               self.resolve_start(start_in_reasoning, prompt, chat_template_kwargs))

    def split(self, text: str, start_in_reasoning: bool | None = None, prompt: str | None = None,
              chat_template_kwargs: dict[str, Any] | None = None) -> tuple[str | None, str | None]:
        """``(reasoning, content)``, each None when empty."""
        s = self.streamer(start_in_reasoning, prompt, chat_template_kwargs)
        r1, c1 = s.feed(text)
        r2, c2 = s.finish()
        return ((r1 or "") + (r2 or "")) or None, ((c1 or "") + (c2 or "")) or None

    # -- tokens
    def tokens(self, tokenizer: Any) -> "ReasoningTokens | None":
        """The token-level view for ``tokenizer``; None when ``</think>`` is not a single token there."""
        end_id = find_token_id(tokenizer, self.end_tag)
        if end_id is None:
            return None
        implicit = {}
        for tag in self.implicit_end_tags:
            tid = find_token_id(tokenizer, tag)
            if tid is not None:
                implicit[tid] = find_token_id(tokenizer, "</" + tag[1:]) if tag.startswith("<") else None
        return ReasoningTokens(find_token_id(tokenizer, self.start_tag), end_id, implicit)


class ReasoningTokens:
    """Token ids of the tags, for deciding on token ids (e.g. when to start applying a JSON grammar)."""

    def __init__(self, start_id: int | None, end_id: int,
                 implicit_end_ids: dict[int, int | None] | None = None):
        self.start_id = start_id
        self.end_id = end_id
        # implicit end id -> the id that closes it (a "<tool_call>" followed later by its "</tool_call>",
        # as in a system prompt's example, is not an end; vLLM)
        self.implicit_end_ids = dict(implicit_end_ids or {})

    def is_reasoning_end(self, token_ids: Sequence[int]) -> bool:
        """vLLM's test over prompt + generated ids: scanning back from the end, an end id (or an unpaired
        implicit one) before any start id means the thinking is over. So a prompt ending in
        ``</think>\\n\\n`` (Qwen3, thinking off) is past it, one ending in ``<think>\\n`` is not."""
        closers = {c for c in self.implicit_end_ids.values() if c is not None}
        seen_closers: set[int] = set()
        for t in reversed(token_ids):
            if t == self.start_id:
                return False
            if t == self.end_id:
                return True
            if t in closers:
                seen_closers.add(t)
            if t in self.implicit_end_ids:
                closer = self.implicit_end_ids[t]
                if closer is None or closer not in seen_closers:
                    return True
        return False

    def ends_in(self, delta_ids: Sequence[int]) -> bool:
        """Whether these newly generated ids contain the end of the thinking (vLLM's streaming test)."""
        return any(t == self.end_id or t in self.implicit_end_ids for t in delta_ids)


def find_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` when it is one token: for a ``tokenizers.Tokenizer``, pyserve's GGUFTokenizer
    (which wraps one), or anything with ``get_vocab()``."""
    for tok in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        if tok is None:
            continue
        f = getattr(tok, "token_to_id", None)
        if callable(f):
            tid = f(text)
            if tid is not None:
                return tid
        g = getattr(tok, "get_vocab", None)
        if callable(g):
            tid = g().get(text)
            if tid is not None:
                return tid
    return None


REASONING_PARSERS: dict[str, ReasoningParser] = {
    "deepseek_r1": ReasoningParser("deepseek_r1"),
    "qwen3": ReasoningParser("qwen3", implicit_end_tags=("<tool_call>",), follows_enable_thinking=True),
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose from {sorted(REASONING_PARSERS)}") from None
