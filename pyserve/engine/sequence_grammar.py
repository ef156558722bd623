"""A sequence's grammar (structured outputs): its matcher, which fills the sampler's token mask
before each step and follows every token sampled. With a reasoning model the grammar may wait for
the token that ends the thinking (`starts_after`), then applies to the answer only."""

from __future__ import annotations

from pyserve.errors import InvalidRequestError


class GrammarViolation(InvalidRequestError):
    """The grammar cannot go on: no token of this vocabulary continues it, or the matcher refused the
    token its own mask allowed (a regex that needs a byte the vocabulary lacks, say). The request's
    grammar is at fault, not the engine: the request fails with a 400 naming the grammar's field."""


class SequenceGrammar:
    def __init__(self, matcher, starts_after: int | None = None, param: str = "response_format"):
        self.matcher = matcher
        self.starts_after = starts_after
        self.active = starts_after is None
        self.param = param  # the request field the grammar came from

    def check(self) -> None:
        """Raise if the matcher has failed: a dead end shows when its mask is filled (it then allows only
        EOS, which must not pass for a normal end)."""
        if self.matcher.error is not None:
            self._fail()

    def accept(self, token_id: int) -> None:
        if not self.active:
            self.active = token_id == self.starts_after
            return
        if token_id < 0 or not self.matcher.accept_token(token_id):
            self._fail()
        self.check()

    def _fail(self):
        raise GrammarViolation(self.param, f"{self.param}: this model's vocabulary cannot continue the output the "
                                           "grammar requires")

    @property
    def terminated(self) -> bool:
        """The grammar is complete and allows nothing more: the sequence stops."""
        return self.active and self.matcher.is_terminated()
