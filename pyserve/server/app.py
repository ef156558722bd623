"""The Sanic app: the model loads in `before_server_start` (so nothing is served
before it is ready), then the OpenAI-compatible routes talk to the engine
through AsyncLLMEngine. Every handler answers in OpenAI's error body; none can
answer 500 for a bad request."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import sys
import time
import uuid

import orjson
from sanic import Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse

import pyserve
from pyserve.engine.async_engine import EngineDeadError, RequestFailedError
from pyserve.engine.chat_template import ChatTemplateError, render_chat
from pyserve.server import logprobs as lpfmt
from pyserve.server import protocol
from pyserve.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pyserve.server.metrics import Metrics
from pyserve.server.protocol import APIError
from pyserve.server.startup import Phases, StartupError, build_engine, process_age, warm_up

log = logging.getLogger("pyserve.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SYSTEM_FINGERPRINT = f"fp_pyserve_{pyserve.__version__}"
OPEN_PATHS = ("/health", "/metrics", "/version")
# After --shutdown-timeout, how long aborted requests get to send their last chunk.
ABORT_GRACE_SECONDS = 5.0
# Larger bodies get 413 before they are read: a context of 128k tokens is under 1 MB of JSON.
MAX_BODY_BYTES = 16 * 2 ** 20


def _json(obj, status: int = 200, headers: dict | None = None) -> HTTPResponse:
    return HTTPResponse(orjson.dumps(obj), status=status, headers=headers, content_type="application/json")


def _json_body(request) -> dict:
    """The request's JSON object; 400 for a Content-Type that is not JSON (a missing one is accepted)."""
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise APIError(400, f"unsupported Content-Type {ctype!r}; send application/json")
    return protocol.parse_json(request.body)


def _error(e: APIError) -> HTTPResponse:
    return _json(e.body(), e.status)


def _sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _sse_chunk(cid: str, obj: str, created: int, model: str, choices: list, usage: dict | None = None,
               **extra) -> bytes:
    """One streamed event in OpenAI's chunk shape (completions and chat differ only in `object`)."""
    c = {"id": cid, "object": obj, "created": created, "model": model,
         "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, **extra}
    if usage is not None:
        c["usage"] = usage
    return _sse(c)


class State:
    def __init__(self, args, t_start: float):
        self.args = args
        self.t_start = t_start
        self.names = args.served_model_name or [args.model or DEFAULT_MODEL_NAME]
        self.metrics = Metrics()
        self.phases = Phases()
        self.engine = None  # LLMEngine
        self.aengine = None  # AsyncLLMEngine
        self.created = int(time.time())
        self.ready_seconds: float | None = None
        self.draining = False
        self.inflight = 0  # API requests being handled (drained on SIGTERM)
        self.request_ids: set[str] = set()  # engine requests added and not yet done
        self.preparing = 0  # prompts past check_queue, being tokenized: they hold their place in the queue

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, model: str | None) -> str:
        if model is not None and model not in self.names:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return self.names[0]

    def check_live(self) -> None:
        if self.aengine is None:
            raise APIError(503, "the server is not ready", type="service_unavailable")
        if self.aengine.dead is not None:
            raise APIError(503, f"the engine has died: {self.aengine.dead!r}", type="engine_dead")

    def check_queue(self, new_requests: int) -> None:
        """429 if admitting these would leave more than --max-queued-requests waiting: requests beyond
        --max-num-seqs wait (the engine's own count lags a step, so take the larger)."""
        limit = self.args.max_queued_requests
        if limit is None:
            return
        active = len(self.request_ids) + self.preparing
        waiting = max(self.aengine.stats().num_waiting, active - self.args.max_num_seqs)
        if max(0, waiting) + new_requests > limit + max(0, self.args.max_num_seqs - active):
            raise APIError(429, f"too many requests waiting (--max-queued-requests {limit}); retry later",
                           type="rate_limit_exceeded", code="queue_full")


def startup(state: State) -> None:
    ph = state.phases
    # "import": everything before the first phase: the interpreter, torch, sanic, the app.
    age = process_age()
    ph.seconds["import"] = age if age is not None else time.time() - state.t_start
    from pyserve.engine.async_engine import AsyncLLMEngine

    built_at = []

    def build():  # on the engine's own thread (see async_engine.py for why)
        engine = build_engine(state.args, ph)
        with ph.phase("warmup"):
            warm_up(engine)
        ph.current = "engine"
        built_at.append(time.perf_counter())
        return engine

    state.aengine = AsyncLLMEngine(build)
    state.engine = state.aengine.engine
    baseline = state.engine.stats()
    ph.seconds["engine"] = time.perf_counter() - built_at[0]  # handing the engine to the event loop
    state.metrics.attach(state.aengine, baseline)
    state.metrics.set_startup(ph.seconds)
    state.ready_seconds = process_age() or (time.time() - state.t_start)
    capacity = state.engine.num_blocks * state.engine.config.block_size
    if capacity < state.engine.max_model_len:
        log.warning("the KV cache holds %d tokens, less than the max model length %d: a request that needs "
                    "more (a chat without max_tokens, say) gets 400; raise --kv-cache-memory or lower "
                    "--max-model-len", capacity, state.engine.max_model_len)
    if state.args.chat_template_text is None and not state.engine.tokenizer.chat_template:
        log.warning("the model has no chat template: /v1/chat/completions will answer 400 (see --chat-template)")


# ---- generation helpers ---------------------------------------------------------------------------


class _Tracker:
    """Per engine request: timing for the metrics."""

    def __init__(self):
        self.arrival = time.perf_counter()
        self.first: float | None = None
        self.done = False


async def _merged(state: State, rids: list[str], iters: list, trackers: list[_Tracker]):
    """Yield (prompt index, RequestOutput) from several engine streams as they come; on exit,
    every request that has not finished is aborted."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, it):
        try:
            async for out in it:
                await q.put((i, out))
            await q.put((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await q.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iters)] if len(iters) > 1 else []
    try:
        if not tasks:  # one prompt: no tasks in between
            async for out in iters[0]:
                _track(state, trackers[0], out)
                yield 0, out
            return
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            _track(state, trackers[i], item)
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        state.request_ids.difference_update(rids)
        for rid, tr in zip(rids, trackers):
            if not tr.done:  # the client left (or an error): abort, and count it
                state.aengine.abort(rid)
                tr.done = True
                now = time.perf_counter()
                state.metrics.record_request("abort", tr.arrival, tr.first, now, 0)
        for it in iters:
            with contextlib.suppress(BaseException):
                await it.aclose()


def _track(state: State, tr: _Tracker, out) -> None:
    now = time.perf_counter()
    if tr.first is None and any(o.token_ids for o in out.outputs):
        tr.first = now
    if out.finished and not tr.done:
        tr.done = True
        state.metrics.record_request(out.outputs[0].finish_reason, tr.arrival, tr.first, now,
                                     sum(len(o.token_ids) for o in out.outputs))


async def _add_all(state: State, base_id: str, prompts: list, params, prompt_param: str):
    """Validate and add every prompt, or none (a bad one aborts those already added). Prompts are
    tokenized off the event loop, which keeps serving (/health included) meanwhile."""
    state.check_queue(len(prompts))
    rids, iters = [], []
    state.preparing += len(prompts)  # until they are in request_ids: a burst must not all pass check_queue
    try:
        prepared = [await state.aengine.prepare(prompt, params) for prompt in prompts]
        for i, prep in enumerate(prepared):
            rid = f"{base_id}-{i}"
            iters.append(state.aengine.add_request(rid, None, prepared=prep))
            rids.append(rid)
    except ValueError as e:
        for rid in rids:
            state.aengine.abort(rid)
        raise protocol.from_value_error(e, prompt_param) from None
    except EngineDeadError as e:
        for rid in rids:
            state.aengine.abort(rid)
        raise APIError(503, str(e), type="engine_dead") from None
    finally:
        state.preparing -= len(prompts)
    state.request_ids.update(rids)
    return rids, iters, [_Tracker() for _ in rids]


async def _respond_sse(state: State, request, rids: list[str]):
    """Start the event stream and send its headers now, so that a request waiting in the queue is
    already a 200 to its client; if that fails (the client is gone), give the requests back."""
    try:
        resp = await request.respond(content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await resp.send(b"")
        return resp
    except BaseException:
        state.request_ids.difference_update(rids)
        for rid in rids:
            state.aengine.abort(rid)
        raise


async def _build(fn, *args, heavy: bool):
    """fn(*args), on a worker thread when heavy: logprobs of a whole prompt (2048 positions x 21
    tokens) take ~0.2 s to decode and shape, which the event loop must not wait for."""
    return await asyncio.to_thread(fn, *args) if heavy else fn(*args)


def _usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ---- the app --------------------------------------------------------------------------------------


def create_app(args, t_start: float | None = None) -> Sanic:
    state = State(args, t_start or time.time())
    app = Sanic("pyserve", configure_logging=False)
    app.config.ACCESS_LOG = False
    app.config.RESPONSE_TIMEOUT = 24 * 3600  # long generations are not timeouts
    app.config.REQUEST_TIMEOUT = 600
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = ABORT_GRACE_SECONDS  # after our own drain (_drain) ended every request
    app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.ctx.state = state

    @app.before_server_start
    async def _load(app):  # noqa: ARG001
        try:
            startup(state)
        except StartupError as e:
            log.error("%s", e)
            _die(1)
        except BaseException as e:  # noqa: BLE001
            log.error("startup failed in phase %r: %s: %s", state.phases.current, type(e).__name__, e)
            _die(1)
        ph = state.phases.seconds
        log.info("startup phases: %s", ", ".join(f"{k} {v:.2f} s" for k, v in ph.items()))
        log.info("serving %s on http://%s:%d", state.names[0], args.host, args.port)
        log.info("ready in %.2f s", state.ready_seconds)

    @app.after_server_start
    async def _signals(app):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _drain, sig)

    def _drain(sig) -> None:
        """SIGTERM/SIGINT: new requests get 503, running ones get --shutdown-timeout to finish,
        then the server stops (exit 0). A second signal stops at once."""
        if state.draining:
            app.stop(terminate=False)
            return
        state.draining = True
        log.info("%s: draining %d request(s), up to %.0f s", signal.Signals(sig).name, state.inflight,
                 args.shutdown_timeout)

        async def wait_then_stop():
            await _wait_inflight(time.monotonic() + args.shutdown_timeout)
            if state.inflight:
                # Aborted requests still end properly: finish_reason "abort", then [DONE].
                log.warning("shutdown timeout: aborting %d request(s)", len(state.request_ids))
                for rid in list(state.request_ids):
                    state.aengine.abort(rid)
                await _wait_inflight(time.monotonic() + ABORT_GRACE_SECONDS)
            app.stop(terminate=False)

        async def _wait_inflight(deadline: float) -> None:
            while state.inflight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

        app.add_task(wait_then_stop())

    @app.after_server_stop
    async def _stop(app):  # noqa: ARG001
        if state.aengine is not None:
            state.aengine.shutdown()

    # -- auth, CORS, errors --

    origins = set(args.allowed_origins or [])

    def _cors_headers(request) -> dict:
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
            return HTTPResponse(status=204, headers=_cors_headers(request))
        if state.draining and request.path != "/metrics":
            return _error(APIError(503, "the server is shutting down", type="service_unavailable"))
        key = args.api_key
        if key is None or request.path in OPEN_PATHS:
            return None
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
            return _json(protocol.error_body("invalid or missing API key (Authorization: Bearer <key>)",
                                             "authentication_error", None, "invalid_api_key"), 401)
        return None

    @app.on_response
    async def _cors(request, response):
        if origins and response is not None:
            for k, v in _cors_headers(request).items():
                response.headers[k] = v

    @app.exception(SanicException)
    async def _sanic_error(request, exc):  # noqa: ARG001
        status = getattr(exc, "status_code", 500) or 500
        kind = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status,
                                                                                         "invalid_request_error")
        return _json(protocol.error_body(str(exc) or kind, kind), status)

    @app.exception(Exception)
    async def _any_error(request, exc):  # noqa: ARG001
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _json(protocol.error_body(f"internal error: {type(exc).__name__}: {exc}", "internal_error"), 500)

    def api(handler):
        async def wrapped(request, *a, **kw):
            state.inflight += 1
            try:
                return await handler(request, *a, **kw)
            except APIError as e:
                return _error(e)
            except EngineDeadError as e:
                return _error(APIError(503, str(e), type="engine_dead"))
            except RequestFailedError as e:  # a bug, not the client's fault; the engine lives on
                return _error(APIError(500, str(e), type="internal_error"))
            except ValueError as e:
                return _error(protocol.from_value_error(e))
            finally:
                state.inflight -= 1

        wrapped.__name__ = handler.__name__
        return wrapped

    # -- simple routes --

    @app.get("/health")
    async def health(request):  # noqa: ARG001
        if state.aengine is None:
            return _error(APIError(503, "the server is not ready", type="service_unavailable"))
        if state.aengine.dead is not None:
            return _error(APIError(503, f"the engine has died: {state.aengine.dead!r}", type="engine_dead"))
        return _json({"status": "ok"})

    @app.get("/version")
    async def version(request):  # noqa: ARG001
        return _json({"version": pyserve.__version__,
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
        return _json({"object": "list", "data": data})

    @app.post("/tokenize")
    @api
    async def tokenize(request):
        state.check_live()
        body = _json_body(request)
        state.check_model(body.get("model"))
        if "messages" in body:
            ids = await _chat_prompt_ids(body)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise APIError(400, "prompt must be a string (or give messages)", param="prompt")
            add_special = body.get("add_special_tokens", True)
            if not isinstance(add_special, bool):
                raise APIError(400, "add_special_tokens must be a boolean", param="add_special_tokens")
            ids = await state.aengine.run_off_loop(state.engine.encode, prompt, add_special)
        return _json({"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids})

    @app.post("/detokenize")
    @api
    async def detokenize(request):
        state.check_live()
        body = _json_body(request)
        state.check_model(body.get("model"))
        ids = body.get("tokens")
        vocab = state.engine.model.cfg.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise APIError(400, f"tokens must be a list of token ids in [0, {vocab})", param="tokens")
        return _json({"prompt": await state.aengine.run_off_loop(state.tokenizer.decode, ids)})

    async def _chat_prompt_ids(body_or_req) -> list[int]:
        """The chat's prompt tokens, rendered and tokenized off the event loop."""
        if isinstance(body_or_req, dict):
            req = protocol.parse_chat({**body_or_req, "max_tokens": None, "stream": False})
        else:
            req = body_or_req
        return await state.aengine.run_off_loop(_render_and_encode, req)

    def _render_and_encode(req) -> list[int]:
        tok = state.tokenizer
        template = args.chat_template_text or tok.chat_template
        try:
            text = render_chat(template, req.messages, req.add_generation_prompt,
                               bos_token=tok.token(tok.bos_token_id) or "", eos_token=tok.token(tok.eos_token_id) or "")
        except ChatTemplateError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        try:
            return state.engine.encode(text, add_special_tokens=False)
        except ValueError as e:
            raise protocol.from_value_error(e, "messages") from None

    # -- completions --

    @app.post("/v1/completions")
    @api
    async def completions(request):
        state.check_live()
        req = protocol.parse_completion(_json_body(request))
        model = state.check_model(req.model)
        text = lpfmt.TokenText(state.tokenizer)
        cid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        n = req.params.n
        rids, iters, trackers = await _add_all(state, cid, req.prompts, req.params, "prompt")
        want_lp = req.params.logprobs is not None

        def echo_text(i: int, out) -> str:
            if not req.echo:
                return ""
            p = req.prompts[i]
            return p if isinstance(p, str) and out.prompt == p else state.tokenizer.decode(out.prompt_token_ids)

        def logprobs(out, o, start: int, offset: int, echo: bool) -> dict | None:
            if not want_lp:
                return None
            prompt = (out.prompt_token_ids, out.prompt_logprobs) if echo and out.prompt_logprobs else None
            return lpfmt.completion_logprobs(text, o.token_ids[start:], (o.logprobs or [])[start:],
                                             None if o.top_logprobs is None else o.top_logprobs[start:],
                                             offset, prompt)

        if not req.stream:
            finals: dict[int, object] = {}
            async with contextlib.aclosing(_merged(state, rids, iters, trackers)) as stream:
                async for i, out in stream:
                    if out.finished:
                        finals[i] = out

            def response() -> dict:
                choices, prompt_tokens, completion_tokens, cached = [], 0, 0, 0
                for i in range(len(req.prompts)):
                    out = finals[i]
                    prompt_tokens += len(out.prompt_token_ids)
                    cached += out.num_cached_tokens
                    prompt_lps = (None if out.prompt_logprobs is None
                                  else lpfmt.prompt_logprobs(text, out.prompt_logprobs))
                    for o in out.outputs:
                        completion_tokens += len(o.token_ids)
                        choice = {"index": i * n + o.index, "text": echo_text(i, out) + o.text,
                                  "logprobs": logprobs(out, o, 0, 0, req.echo),
                                  "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                        if prompt_lps is not None:
                            choice["prompt_logprobs"] = prompt_lps
                        if req.return_token_ids:
                            choice["prompt_token_ids"] = out.prompt_token_ids
                            choice["token_ids"] = o.token_ids
                        choices.append(choice)
                return {"id": cid, "object": "text_completion", "created": created, "model": model,
                        "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices,
                        "usage": _usage(prompt_tokens, completion_tokens, cached)}

            return _json(await _build(response, heavy=req.params.prompt_logprobs is not None))

        resp = await _respond_sse(state, request, rids)

        def chunk(choice, usage=None):
            return _sse_chunk(cid, "text_completion", created, model, [choice], usage)

        sent_tokens: dict[tuple[int, int], int] = {}
        sent_chars: dict[tuple[int, int], int] = {}
        prompt_tokens = {}
        completion_tokens: dict[tuple[int, int], int] = {}
        generated: dict[tuple[int, int], int] = {}  # tokens so far, for continuous_usage_stats
        cached = {}
        try:
            async with contextlib.aclosing(_merged(state, rids, iters, trackers)) as stream:
                async for i, out in stream:
                    prompt_tokens[i] = len(out.prompt_token_ids)
                    cached[i] = out.num_cached_tokens
                    for o in out.outputs:
                        generated[(i, o.index)] = len(o.token_ids)
                    # One choice per chunk, as OpenAI and vLLM stream n > 1 and several prompts.
                    for o in out.outputs:
                        key = (i, o.index)
                        if key in completion_tokens:
                            continue  # already finished
                        first = key not in sent_chars
                        start = sent_tokens.get(key, 0)
                        if not o.delta_text and len(o.token_ids) == start and not o.finished \
                                and not (first and req.echo):
                            continue
                        echo = first and req.echo
                        pre = echo_text(i, out) if echo else ""
                        offset = 0 if echo else sent_chars.get(key, 0)
                        lp = await _build(logprobs, out, o, start, offset, echo, heavy=echo and want_lp)
                        choice = {"index": i * n + o.index, "text": pre + o.delta_text, "logprobs": lp,
                                  "finish_reason": o.finish_reason,
                                  "stop_reason": o.stop_reason if o.finished else None}
                        if req.return_token_ids:
                            if first:
                                choice["prompt_token_ids"] = out.prompt_token_ids
                            choice["token_ids"] = o.token_ids[start:]
                        sent_chars[key] = sent_chars.get(key, 0) + len(choice["text"])
                        sent_tokens[key] = len(o.token_ids)
                        if o.finished:
                            completion_tokens[key] = len(o.token_ids)
                        usage = (_usage(sum(prompt_tokens.values()), sum(generated.values()), sum(cached.values()))
                                 if req.continuous_usage else None)
                        await resp.send(chunk(choice, usage))
            if req.include_usage:
                await resp.send(_sse_chunk(cid, "text_completion", created, model, [],
                                           _usage(sum(prompt_tokens.values()), sum(completion_tokens.values()),
                                                  sum(cached.values()))))
        except (EngineDeadError, RequestFailedError, ValueError) as e:
            await resp.send(_sse(protocol.error_body(str(e), "engine_error")))
        await resp.send(b"data: [DONE]\n\n")
        await resp.eof()
        return None

    # -- chat --

    @app.post("/v1/chat/completions")
    @api
    async def chat(request):
        state.check_live()
        req = protocol.parse_chat(_json_body(request))
        model = state.check_model(req.model)
        text = lpfmt.TokenText(state.tokenizer)
        ids = await _chat_prompt_ids(req)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        rids, iters, trackers = await _add_all(state, cid, [ids], req.params, "messages")
        want_lp = req.top_logprobs is not None

        def logprobs(o, start: int) -> dict | None:
            if not want_lp:
                return None
            return lpfmt.chat_logprobs(text, o.token_ids[start:], (o.logprobs or [])[start:],
                                       None if o.top_logprobs is None else o.top_logprobs[start:])

        if not req.stream:
            final = None
            async with contextlib.aclosing(_merged(state, rids, iters, trackers)) as stream:
                async for _, out in stream:
                    if out.finished:
                        final = out
            choices = []
            for o in final.outputs:
                choice = {"index": o.index, "message": {"role": "assistant", "content": o.text},
                          "logprobs": logprobs(o, 0), "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                if req.return_token_ids:
                    choice["token_ids"] = o.token_ids
                choices.append(choice)
            body = {"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices,
                    "usage": _usage(len(final.prompt_token_ids), sum(len(o.token_ids) for o in final.outputs),
                                    final.num_cached_tokens)}
            if final.prompt_logprobs is not None:
                body["prompt_logprobs"] = await _build(lpfmt.prompt_logprobs, text, final.prompt_logprobs, heavy=True)
            if req.return_token_ids:
                body["prompt_token_ids"] = final.prompt_token_ids
            return _json(body)

        resp = await _respond_sse(state, request, rids)

        def chunk(choice, usage=None, **extra):
            return _sse_chunk(cid, "chat.completion.chunk", created, model, [choice], usage, **extra)

        n = req.params.n
        for k in range(n):  # one choice per chunk, as OpenAI and vLLM stream n > 1
            await resp.send(chunk({"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None},
                                  _usage(len(ids), 0) if req.continuous_usage else None,
                                  **({"prompt_token_ids": ids} if req.return_token_ids and k == 0 else {})))
        sent_tokens = [0] * n
        done = [False] * n
        last = None
        try:
            async with contextlib.aclosing(_merged(state, rids, iters, trackers)) as stream:
                async for _, out in stream:
                    last = out
                    for o in out.outputs:
                        if done[o.index]:
                            continue
                        start = sent_tokens[o.index]
                        if not o.delta_text and len(o.token_ids) == start and not o.finished:
                            continue
                        choice = {"index": o.index, "delta": {"content": o.delta_text} if o.delta_text else {},
                                  "logprobs": logprobs(o, start), "finish_reason": o.finish_reason,
                                  "stop_reason": o.stop_reason if o.finished else None}
                        if req.return_token_ids:
                            choice["token_ids"] = o.token_ids[start:]
                        sent_tokens[o.index] = len(o.token_ids)
                        done[o.index] = o.finished
                        usage = (_usage(len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs),
                                        out.num_cached_tokens) if req.continuous_usage else None)
                        await resp.send(chunk(choice, usage))
            if req.include_usage and last is not None:
                await resp.send(_sse_chunk(cid, "chat.completion.chunk", created, model, [],
                                           _usage(len(last.prompt_token_ids),
                                                  sum(len(o.token_ids) for o in last.outputs),
                                                  last.num_cached_tokens)))
        except (EngineDeadError, RequestFailedError, ValueError) as e:
            await resp.send(_sse(protocol.error_body(str(e), "engine_error")))
        await resp.send(b"data: [DONE]\n\n")
        await resp.eof()
        return None

    return app


def _die(code: int) -> None:
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(args, t_start: float | None = None) -> int:
    app = create_app(args, t_start)
    app.run(host=args.host, port=args.port, single_process=True, access_log=False, auto_reload=False,
            motd=False, debug=False)
    return 0
