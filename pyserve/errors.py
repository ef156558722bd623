"""The error a request gets for being wrong, typed: which field (`param`, as the API names it) and,
where OpenAI has one, the `code`. The engine and SamplingParams raise it; the server turns it into a
400 in OpenAI's error shape without reading the message."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine refuses. `param` "prompt" stands for whatever carried the prompt (the
    server says `messages` for a chat)."""

    def __init__(self, param: str | None, message: str, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code
