"""Response bodies on the wire: JSON, server-sent events in OpenAI's chunk shape, and usage."""

from __future__ import annotations

import orjson
from sanic.response import HTTPResponse

import pyserve

SYSTEM_FINGERPRINT = f"fp_pyserve_{pyserve.__version__}"
SSE_DONE = b"data: [DONE]\n\n"


def json_response(obj, status: int = 200, headers: dict | None = None) -> HTTPResponse:
    return HTTPResponse(orjson.dumps(obj), status=status, headers=headers, content_type="application/json")


def sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


class ResponseHead:
    """What every body and chunk of one response repeats: id, object, created, model."""

    def __init__(self, response_id: str, obj: str, created: int, model: str):
        self.id, self.object, self.created, self.model = response_id, obj, created, model

    def body(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, **extra}

    def chunk(self, choices: list, usage: dict | None = None, **extra) -> bytes:
        """One streamed event (completions and chat differ only in `object`)."""
        c = self.body(choices, **extra)
        if usage is not None:
            c["usage"] = usage
        return sse(c)
