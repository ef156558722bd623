"""The grammar layer's interface: compile a GrammarSpec once, then one matcher per sequence.

The engine's use, per structured request:

    compiled = backend.compile(spec)      # a worker thread; GrammarError -> 400 naming e.param
    matcher = backend.new_matcher(compiled)
    each step:  matcher.fill_bitmask(bitmask[row])   # or backend.fill_bitmasks([(m, row), ...], bitmask)
                ... the sampler draws only allowed ids ...
                ok = matcher.accept_token(token_id)  # False: the token broke the grammar
                matcher.is_terminated()              # True: nothing but EOS can follow: stop

The bitmask is llguidance's and xgrammar's layout, which the sample op takes as
`allowed_token_bitmask`: int32 [batch, ceil(V / 32)], token id t allowed iff bit t % 32 of word
t // 32 is set. V is the model's vocabulary size; ids the tokenizer does not have are never allowed.
Wherever the grammar may end, every EOS id is allowed, and accepting any of them ends it.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch

from pyserve.structured.spec import GrammarSpec


class CompiledGrammar:
    """A spec compiled for one backend and one vocabulary: immutable, shared by every request with
    the same spec (the backend's LRU cache holds it)."""

    spec: GrammarSpec


class GrammarMatcher(abc.ABC):
    """One sequence's position in its grammar. Not thread-safe: one thread (the engine's) uses it."""

    @abc.abstractmethod
    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row` (int32, CPU, contiguous, [num_words]) in place.
        Once terminated, only the EOS ids; in the error state, only the EOS ids as well, so that a
        row always allows something."""

    @abc.abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False when it breaks the grammar (the matcher is then in
        its error state for good and `error` says why)."""

    @abc.abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and nothing but EOS can follow (or an EOS was accepted, or the
        matcher failed): the sequence must stop."""

    @abc.abstractmethod
    def can_terminate(self) -> bool:
        """The output so far is complete: an EOS may come next (it may also continue)."""

    @property
    @abc.abstractmethod
    def error(self) -> str | None:
        """Why the matcher failed, or None."""


class GrammarBackend(abc.ABC):
    """A grammar library bound to one model's vocabulary (built once, shared by all requests).
    compile() may run in a worker thread while the engine thread fills masks."""

    name: str
    vocab_size: int  # the model's: the mask covers ids [0, vocab_size)
    eos_token_ids: tuple[int, ...]

    @property
    def num_words(self) -> int:
        """int32 words per mask row: ceil(vocab_size / 32)."""
        return (self.vocab_size + 31) // 32

    @abc.abstractmethod
    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile (or fetch from the LRU cache). Raises GrammarError(message, spec.param)."""

    @abc.abstractmethod
    def new_matcher(self, compiled: CompiledGrammar) -> GrammarMatcher:
        """A fresh matcher at the grammar's start."""

    def fill_bitmasks(self, matchers: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None:
        """Fill row `i` of `bitmask` ([batch, num_words] int32 CPU) for each (matcher, i). Rows not
        named are left as they are (all ones, -1, lets a row's sequence sample freely)."""
        for matcher, i in matchers:
            matcher.fill_bitmask(bitmask[i])

    def allocate_bitmask(self, batch: int) -> torch.Tensor:
        """A [batch, num_words] int32 CPU mask with every token allowed."""
        return torch.full((batch, self.num_words), -1, dtype=torch.int32)


def check_row(row: torch.Tensor, num_words: int) -> None:
    if row.dtype != torch.int32 or row.device.type != "cpu" or row.dim() != 1 or not row.is_contiguous():
        raise ValueError(f"bitmask row: expected a contiguous 1-D int32 CPU tensor, got {row.dtype} "
                         f"{tuple(row.shape)} on {row.device}{'' if row.is_contiguous() else ' (not contiguous)'}")
    if row.numel() != num_words:
        raise ValueError(f"bitmask row: expected {num_words} words, got {row.numel()}")


def unpack_bitmask(row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The bool [vocab_size] mask a bitmask row encodes (a reference for tests and the sampler's)."""
    bits = (row.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1
    return bits.flatten(-2)[..., :vocab_size].bool()


def allowed_ids(row: torch.Tensor, vocab_size: int) -> list[int]:
    return unpack_bitmask(row, vocab_size).nonzero().flatten().tolist()
