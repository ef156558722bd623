"""The grammar backend on llguidance (Microsoft's guidance-ai/llguidance, Rust, no torch dependency).

Chosen over xgrammar by bench/structured_backends.py (bench/README.md, "Structured outputs: grammar
backend"). Set up as vLLM's guidance backend sets it up: JSON schemas through
`grammar_from_json_schema` with `whitespace_flexible` unless the request turns it off, json_object
as the schema {"type": "object"}, regex / choice / grammar (Lark, or GBNF) through `grammar_from`.

Threads: LLMatcher's constructor, compute_mask and the executor's batch fill release the GIL, so a
compile in a worker thread runs alongside the engine thread's mask fills. A matcher belongs to one
thread (PyO3 refuses a second borrow); the compiled template that new_matcher() copies is shared,
so copying it takes a lock, as does the LRU cache.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
import torch

from pyserve.loader.gguf_tokenizer import GGUFTokenizer
from pyserve.structured.backend import CompiledGrammar, GrammarBackend, GrammarMatcher, check_row
from pyserve.structured.spec import GrammarError, GrammarSpec
from pyserve.structured.vocab import plain_encoder, token_bytes

log = logging.getLogger(__name__)

_MAX_MESSAGE = 800
# Errors without the parser state and the grammar text (what a token broke stays in the message).
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class _Wrapper:
    """What llguidance.TokenizerWrapper reads: the vocabulary as bytes, the special ids, and an
    encoder. llguidance tokenizes the bytes a grammar forces (a JSON object's opening '{"') to
    decide which tokens may spell them, so the encoder must spell exactly the bytes it is given:
    a SentencePiece tokenizer's space in front of the text would allow only " {" at the start."""

    def __init__(self, tokenizer: GGUFTokenizer, tokens: list[bytes], special: Sequence[int], eos: int):
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = tokens
        self.special_token_ids = list(special)
        self._special = frozenset(special)
        self._encoder = plain_encoder(tokenizer.tokenizer)
        self._by_bytes: dict[bytes, int] | None = None
        self._longest = 1

    def __call__(self, data: str | bytes) -> list[int]:
        raw = data if isinstance(data, bytes) else data.encode("utf-8")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._greedy(raw)
        ids = self._encoder.encode(text, add_special_tokens=False).ids
        if b"".join(self.tokens[i] if i < len(self.tokens) else b"\0" for i in ids) == raw:
            return ids
        return self._greedy(raw)  # a normalizer changed the text (NFKC, stripping)

    def _greedy(self, raw: bytes) -> list[int]:
        """Longest match over the vocabulary's bytes: a spelling, if not the tokenizer's own."""
        if self._by_bytes is None:
            by_bytes: dict[bytes, int] = {}
            for i, b in enumerate(self.tokens):
                if b and i not in self._special:
                    by_bytes.setdefault(b, i)
            self._by_bytes, self._longest = by_bytes, max(map(len, by_bytes), default=1)
        ids, pos = [], 0
        while pos < len(raw):
            for n in range(min(self._longest, len(raw) - pos), 0, -1):
                i = self._by_bytes.get(raw[pos:pos + n])
                if i is not None:
                    ids.append(i)
                    pos += n
                    break
            else:  # a byte no token spells: skip it (llguidance then sees a shorter spelling)
                pos += 1
        return ids


def _user_message(spec: GrammarSpec, error: str) -> str:
    """llguidance's error, worded for the client: the regex crate's one-line cause, "line L,
    column C" for a Lark position, JSON Schema keywords named plainly."""
    error = error.strip()
    if spec.kind == "regex":
        lines = error.splitlines()
        cause = next((ln[len("error: "):] for ln in lines if ln.startswith("error: ")), lines[0])
        msg = f"invalid regular expression {spec.value!r}: {cause}"
    elif spec.kind in ("json_schema", "json_object"):
        lines = error.splitlines()
        m = re.fullmatch(r"Unimplemented keys: \[(.*)\]", lines[0])
        cause = next((ln[len("error: "):] for ln in lines if ln.startswith("error: ")), None)
        if m:
            msg = f"JSON Schema keyword(s) not supported: {m.group(1)}"
        elif lines[0].startswith("regex parse error") and cause and len(lines) > 1:
            msg = f"invalid JSON schema: pattern {lines[1].strip()!r}: {cause}"
        else:
            msg = "invalid JSON schema: " + " ".join(ln.strip() for ln in error.splitlines() if ln.strip())
    else:
        error = re.sub(r"^(?:at )?(\d+)\((\d+)\): ", r"line \1, column \2: ", error)
        error = error.replace("Failed to convert the grammar from GBNF to Lark: ", "neither Lark nor GBNF syntax: ")
        what = "choices" if spec.kind == "choice" else "grammar"
        msg = f"invalid {what}: {error}"
    if len(msg) > _MAX_MESSAGE:
        msg = msg[:_MAX_MESSAGE] + " ..."
    return f"{spec.param}: {msg}"


class LLGuidanceCompiled(CompiledGrammar):
    def __init__(self, spec: GrammarSpec, grammar: str, template: llguidance.LLMatcher):
        self.spec = spec
        self.grammar = grammar  # llguidance's serialized grammar
        self._template = template  # a matcher at the start, copied for each request
        self._lock = threading.Lock()

    def copy_matcher(self) -> llguidance.LLMatcher:
        with self._lock:
            return self._template.deep_copy()


class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, backend: LLGuidanceBackend, matcher: llguidance.LLMatcher):
        self._backend = backend
        self._m = matcher
        self._eos = frozenset(backend.eos_token_ids)
        self._ended = False  # an EOS was accepted

    def fill_bitmask(self, row: torch.Tensor) -> None:
        check_row(row, self._backend.num_words)
        if self._m.is_error():
            self._backend.write_eos_only(row)
            return
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        if self._m.is_error():  # a dead end (no token continues the grammar) or a resource limit
            log.info("grammar matcher failed: %s", self.error)
            self._backend.write_eos_only(row)

    def accept_token(self, token_id: int) -> bool:
        if self._m.is_error():  # failed for good (llguidance would still take an EOS)
            return False
        if self._ended and token_id in self._eos:
            return True  # a second EOS after the end (e.g. the engine's own EOS step)
        ok = self._m.consume_token(int(token_id))
        if ok and token_id in self._eos:
            self._ended = True
        return ok

    def is_terminated(self) -> bool:
        return self._ended or self._m.is_stopped()

    def can_terminate(self) -> bool:
        return self._ended or (not self._m.is_error() and self._m.is_accepting())

    @property
    def error(self) -> str | None:
        if not self._m.is_error():
            return None
        return self._m.get_error().replace("<non-verbose/>", "").strip() or "the grammar matcher failed"

    @property
    def raw(self) -> llguidance.LLMatcher:
        return self._m


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, tokenizer: GGUFTokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = 256, num_threads: int | None = None):
        eos = tuple(dict.fromkeys(int(i) for i in eos_token_ids if 0 <= int(i) < vocab_size))
        if not eos:
            raise ValueError("a grammar backend needs at least one EOS id below the vocabulary size")
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = eos
        vocab = token_bytes(tokenizer.tokenizer, self.vocab_size, eos)
        self.vocab_kind = vocab.kind
        wrapper = _Wrapper(tokenizer, vocab.tokens, sorted(vocab.special_ids), eos[0])
        self.ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), eos_token=list(eos))
        words = [0] * self.num_words
        for i in eos:
            words[i // 32] |= 1 << (i % 32)
        self._eos_row = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
        self._cache: OrderedDict[GrammarSpec, LLGuidanceCompiled] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._num_threads = num_threads
        self._executor: llguidance.LLExecutor | None = None
        self.hits = self.misses = 0

    # -- compile ----------------------------------------------------------------------------

    def serialize(self, spec: GrammarSpec) -> str:
        """The spec as llguidance's grammar text (not yet checked)."""
        options = {"whitespace_flexible": spec.whitespace_flexible}
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=options)
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=options)
        if spec.kind == "regex":
            return llguidance.grammar_from("regex", spec.value)
        if spec.kind == "choice":
            return llguidance.grammar_from("choice", list(spec.value))
        return llguidance.grammar_from("grammar", spec.value)  # Lark, or GBNF (converted)

    def compile(self, spec: GrammarSpec) -> LLGuidanceCompiled:
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                return hit
            self.misses += 1
        try:
            grammar = self.serialize(spec)
        except ValueError as e:  # a schema that is not an object, a GBNF grammar that does not convert
            raise GrammarError(_user_message(spec, str(e)), spec.param) from None
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=_LIMITS)  # releases the GIL
        if matcher.is_error():
            raise GrammarError(_user_message(spec, matcher.get_error()), spec.param)
        for w in matcher.get_grammar_warnings():
            log.info("grammar warning (%s): %s", spec.kind, w)
        compiled = LLGuidanceCompiled(spec, grammar, matcher)
        with self._lock:
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def cache_len(self) -> int:
        with self._lock:
            return len(self._cache)

    # -- matchers ---------------------------------------------------------------------------

    def new_matcher(self, compiled: CompiledGrammar) -> LLGuidanceMatcher:
        if not isinstance(compiled, LLGuidanceCompiled):
            raise TypeError(f"expected a grammar compiled by llguidance, got {type(compiled).__name__}")
        return LLGuidanceMatcher(self, compiled.copy_matcher())

    def write_eos_only(self, row: torch.Tensor) -> None:
        row.copy_(self._eos_row)

    def fill_bitmasks(self, matchers: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None:
        """The rows filled in parallel on llguidance's thread pool (the GIL released)."""
        if len(matchers) <= 1:
            return super().fill_bitmasks(matchers, bitmask)
        if (bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2
                or bitmask.shape[1] != self.num_words or not bitmask.is_contiguous()):
            raise ValueError(f"bitmask: expected a contiguous int32 CPU tensor [batch, {self.num_words}], "
                             f"got {bitmask.dtype} {tuple(bitmask.shape)} on {bitmask.device}")
        batch = bitmask.shape[0]
        pairs, failed = [], []
        for m, i in matchers:
            if not 0 <= i < batch:
                raise IndexError(f"bitmask row {i} out of range for batch {batch}")
            assert isinstance(m, LLGuidanceMatcher)
            (failed if m.raw.is_error() else pairs).append((m, i))
        if pairs:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(self._num_threads)
            self._executor.unsafe_compute_mask_ptr([(m.raw, i) for m, i in pairs], bitmask.data_ptr(),
                                                   self.num_words * 4, batch)
            failed += [(m, i) for m, i in pairs if m.raw.is_error()]
        for _, i in failed:
            self.write_eos_only(bitmask[i])
