"""The Sanic app: the model loads in `before_server_start` (lifecycle.py, so nothing is served
before it is ready), then the OpenAI-compatible routes (routes/) talk to the engine through
AsyncLLMEngine. Every handler answers in OpenAI's error body; none can answer 500 for a bad
request. Here: the app's settings, auth and CORS, and the mapping of errors to responses."""

from __future__ import annotations

import hmac
import logging
import time

from sanic import Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse

from pyserve.engine.async_engine import EngineDeadError, RequestFailedError
from pyserve.errors import InvalidRequestError
from pyserve.server import lifecycle
from pyserve.server.errors import APIError, error_body
from pyserve.server.responses import json_response
from pyserve.server.routes import chat, completions, info
from pyserve.server.state import ServerState

log = logging.getLogger("pyserve.server")

# Larger bodies get 413 before they are read: a context of 128k tokens is under 1 MB of JSON.
MAX_BODY_BYTES = 16 * 2 ** 20


def _error(e: APIError) -> HTTPResponse:
    return json_response(e.body(), e.status)


def create_app(args, t_start: float | None = None) -> Sanic:
    state = ServerState(args, t_start or time.time())
    app = Sanic("pyserve", configure_logging=False)
    app.config.ACCESS_LOG = False
    app.config.RESPONSE_TIMEOUT = 24 * 3600  # long generations are not timeouts
    app.config.REQUEST_TIMEOUT = 600
    # After our own drain (lifecycle._drain) ended every request.
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = lifecycle.ABORT_GRACE_SECONDS
    app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.ctx.state = state
    lifecycle.install(app, state)
    _install_auth_and_cors(app, state)
    _install_error_handlers(app)

    def api(handler):
        """Counts the request as in flight (drain waits for it) and maps errors to responses."""
        async def wrapped(request, *a, **kw):
            state.inflight += 1
            try:
                return await handler(request, *a, **kw)
            except APIError as e:
                return _error(e)
            except InvalidRequestError as e:
                return _error(APIError.invalid(e))
            except EngineDeadError as e:
                return _error(APIError.engine_dead(e))
            except RequestFailedError as e:  # the request's fault (param) or a bug; the engine lives on
                if e.param is not None:
                    return _error(APIError(400, str(e), param=e.param))
                return _error(APIError(500, str(e), type="internal_error"))
            except ValueError as e:  # the engine refusing a request in a way not typed above
                return _error(APIError(400, str(e)))
            finally:
                state.inflight -= 1

        wrapped.__name__ = handler.__name__
        return wrapped

    for routes in (info, completions, chat):
        routes.register(app, state, api)
    return app


def _install_auth_and_cors(app, state) -> None:
    args = state.args
    origins = set(args.allowed_origins or [])

    def cors_headers(request) -> dict:
        origin = request.headers.get("origin")
        if not origins or origin is None:
            return {}
        if "*" in origins:
            allow = "*"
        elif origin in origins:
            allow = origin
        else:
            return {}
        return {"Access-Control-Allow-Origin": allow, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type", "Vary": "Origin"}

    @app.on_request
    async def _auth(request):
        if request.method == "OPTIONS" and origins:
            return HTTPResponse(status=204, headers=cors_headers(request))
        if state.draining and request.path != "/metrics":
            return _error(APIError(503, "the server is shutting down", type="service_unavailable"))
        key = args.api_key
        if key is None or request.path in info.OPEN_PATHS:
            return None
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
            return json_response(error_body("invalid or missing API key (Authorization: Bearer <key>)",
                                            "authentication_error", None, "invalid_api_key"), 401)
        return None

    @app.on_response
    async def _cors(request, response):
        if origins and response is not None:
            for k, v in cors_headers(request).items():
                response.headers[k] = v


def _install_error_handlers(app) -> None:
    @app.exception(SanicException)
    async def _sanic_error(request, exc):  # noqa: ARG001
        status = getattr(exc, "status_code", 500) or 500
        kind = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status,
                                                                                         "invalid_request_error")
        return json_response(error_body(str(exc) or kind, kind), status)

    @app.exception(Exception)
    async def _any_error(request, exc):  # noqa: ARG001
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_response(error_body(f"internal error: {type(exc).__name__}: {exc}", "internal_error"), 500)


def serve(args, t_start: float | None = None) -> int:
    app = create_app(args, t_start)
    app.run(host=args.host, port=args.port, single_process=True, access_log=False, auto_reload=False,
            motd=False, debug=False)
    return 0
