"""The small routes: /health, /version, /metrics, /v1/models, /tokenize, /detokenize."""

from __future__ import annotations

from sanic.response import HTTPResponse

import pyserve
from pyserve.errors import InvalidRequestError
from pyserve.server import protocol
from pyserve.server.errors import APIError
from pyserve.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pyserve.server.responses import json_response
from pyserve.server.routes.chat import chat_prompt
from pyserve.server.state import DEFAULT_MODEL_NAME

OPEN_PATHS = ("/health", "/metrics", "/version")  # answered without an API key


def register(app, state, api) -> None:
    args = state.args

    @app.get("/health")
    async def health(request):  # noqa: ARG001
        try:
            state.check_live()
        except APIError as e:
            return json_response(e.body(), e.status)
        return json_response({"status": "ok"})

    @app.get("/version")
    async def version(request):  # noqa: ARG001
        return json_response({"version": pyserve.__version__,
                              "startup": {"phases": state.phases.seconds, "ready_seconds": state.ready_seconds}})

    @app.get("/metrics")
    async def metrics(request):  # noqa: ARG001
        return HTTPResponse(state.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    @api
    async def models(request):  # noqa: ARG001
        state.check_live()
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "pyserve",
                 "root": args.model or DEFAULT_MODEL_NAME, "parent": None,
                 "max_model_len": state.engine.max_model_len} for name in state.names]
        return json_response({"object": "list", "data": data})

    @app.post("/tokenize")
    @api
    async def tokenize(request):
        state.check_live()
        body = protocol.json_body(request)
        state.check_model(body.get("model"))
        if "messages" in body:
            _, ids = await chat_prompt(state, protocol.parse_chat({**body, "max_tokens": None, "stream": False}))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise APIError(400, "prompt must be a string (or give messages)", param="prompt")
            add_special = body.get("add_special_tokens", True)
            if not isinstance(add_special, bool):
                raise APIError(400, "add_special_tokens must be a boolean", param="add_special_tokens")
            try:
                ids = await state.engine.encode(prompt, add_special)
            except InvalidRequestError as e:
                raise APIError.invalid(e) from None
        return json_response({"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids})

    @app.post("/detokenize")
    @api
    async def detokenize(request):
        state.check_live()
        body = protocol.json_body(request)
        state.check_model(body.get("model"))
        ids = body.get("tokens")
        vocab = state.engine.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise APIError(400, f"tokens must be a list of token ids in [0, {vocab})", param="tokens")
        return json_response({"prompt": await state.engine.decode(ids)})
