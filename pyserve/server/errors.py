"""Errors in OpenAI's shape. A handler raises APIError (status, message, `type`, `param`, `code`)
and the app answers `{"error": {...}}` with that status; the engine's typed InvalidRequestError
maps onto it field for field, without reading its message."""

from __future__ import annotations

from pyserve.errors import InvalidRequestError


class APIError(Exception):
    """Becomes `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    @classmethod
    def invalid(cls, e: InvalidRequestError, prompt_param: str = "prompt") -> "APIError":
        """A 400 for what the engine refused; its "prompt" is what carried the prompt in this request."""
        param = prompt_param if e.param == "prompt" else e.param
        return cls(400, str(e), param=param, code=e.code)

    @classmethod
    def engine_dead(cls, e: BaseException) -> "APIError":
        return cls(503, str(e), type="engine_dead")


def stream_error_body(e: Exception) -> dict:
    """The error event that ends a stream whose request failed after its 200 was sent."""
    param = getattr(e, "param", None)
    if param is not None:  # the request's own fault, found while generating (its grammar)
        return error_body(str(e), "invalid_request_error", param)
    return error_body(str(e), "engine_error")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
