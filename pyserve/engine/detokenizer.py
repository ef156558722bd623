"""Turning a stream of generated token ids into a stream of text, one token at a time.

Two layers, each holding text back for its own reason:

1. Decoding (vLLM's prefix/read-offset technique). A byte-level BPE token can end in the middle of
   a UTF-8 character (emoji, CJK), and some decoders treat a token differently at the start of a
   text (SentencePiece's leading space). So each step decodes a short window of recent tokens
   twice, `ids[prefix:read]` (already released) and `ids[prefix:]` (with the new tokens), and the
   new text is the difference. While the window's text ends in U+FFFD (a character not complete
   yet) nothing is released and the window grows; once it decodes cleanly both offsets move up.
   The window starts with a few prompt tokens for context, so the first generated token decodes
   as it would mid-text.

2. Stop strings. Decoded text goes to `_pending` first. A stop string found there ends the
   sequence: the text is cut right before it (or after it, with include_stop_str_in_output) and
   nothing past the cut is ever released. Otherwise everything is released except the longest
   suffix of `_pending` that is a prefix of some stop string: it may yet grow into one. Text held
   this way always contains the start of any future match, so matches are only searched for in
   `_pending`, which stays shorter than the longest stop string plus one step's text.

When several stop strings match, the one that is complete first in the text wins (the earliest
end; of those ending at the same place, the earliest start): the result depends only on the text,
not on where the token boundaries fall, and the released text never contains a stop string.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer

# Prompt tokens decoded in front of the generated ones, as context (vLLM uses 5 too).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


@functools.lru_cache(maxsize=8)
def _proper_prefixes(stops: tuple[str, ...]) -> frozenset[str]:
    """The tails worth holding back; quadratic in a stop string's length (SamplingParams caps it), so
    built once for the n samples of a request."""
    return frozenset(s[:i] for s in stops for i in range(1, len(s)))


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        skip_special_tokens: bool,
        stop: list[str],
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = list(stop)
        self._include_stop = include_stop_str_in_output
        self._stop_prefixes = _proper_prefixes(tuple(self._stop))
        self._max_hold = max((len(s) - 1 for s in self._stop), default=0)

        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith(_REPLACEMENT):
            context = []  # a prompt cut mid-character would garble the first generated text
        self._ids: list[int] = context  # context + generated; the window is _ids[_prefix:]
        self._num_context = len(context)
        self._prefix = 0
        self._read = len(context)

        self._pending = ""  # decoded, not released (may grow into a stop string)
        self._released: list[str] = []
        self._stop_matched: str | None = None
        self._finished = False

    # -- public ---------------------------------------------------------------------------------

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids pushed so far."""
        return self._ids[self._num_context :]

    @property
    def text(self) -> str:
        """All text released so far (the concatenation of what push() and finish() returned)."""
        return "".join(self._released)

    @property
    def stop_matched(self) -> str | None:
        """The stop string that ended the sequence, once one has."""
        return self._stop_matched

    @property
    def finished(self) -> bool:
        """True after a stop string matched or finish() was called: push() then returns ""."""
        return self._finished

    def push(self, token_id: int) -> str:
        """Append one generated token; return the text that became releasable (possibly "")."""
        if self._finished:
            return ""
        self._ids.append(token_id)
        return self._release(self._decode_step(), final=False)

    def finish(self) -> str:
        """End the sequence (length, EOS, ...): return all text still held back.

        Bytes of an incomplete character come out as U+FFFD, as in a full decode. Should the
        flushed text complete a stop string, it is cut there like in push().
        """
        if self._finished:
            return ""
        window = self._ids[self._prefix :]
        delta = self._decode(window)[len(self._decode(self._ids[self._prefix : self._read])) :]
        self._prefix = self._read = len(self._ids)
        return self._release(delta, final=True)

    # -- decoding -------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip_special) if ids else ""

    def _decode_step(self) -> str:
        """New complete text of the window, moving the offsets when there is some."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if new_text.endswith(_REPLACEMENT) or len(new_text) < len(prefix_text):
            return ""  # an incomplete character (or a decoder oddity): wait for more tokens
        self._prefix = self._read
        self._read = len(self._ids)
        return new_text[len(prefix_text) :]

    # -- stop strings ---------------------------------------------------------------------------

    def _release(self, delta: str, final: bool) -> str:
        pending = self._pending + delta
        match = self._first_stop(pending)
        if match is not None:
            start, stop = match
            out = pending[: start + len(stop) if self._include_stop else start]
            self._pending = ""
            self._stop_matched = stop
            self._finished = True
        else:
            hold = 0 if final else self._hold_len(pending)
            out = pending[: len(pending) - hold]
            self._pending = pending[len(pending) - hold :]
            self._finished = final
        if out:
            self._released.append(out)
        return out

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string complete first in text (earliest end, then earliest start)."""
        best: tuple[int, int, str] | None = None
        for s in self._stop:
            i = text.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        return None if best is None else (best[1], best[2])

    def _hold_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            if text[-k:] in self._stop_prefixes:
                return k
        return 0
