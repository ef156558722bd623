"""The server's life: load and warm the engine before the first request (startup phases timed),
drain on SIGTERM/SIGINT, shut the engine down after the server stops, and exit at once when
startup fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time

from pyserve.server.startup import StartupError, build_engine, process_age, warm_up

log = logging.getLogger("pyserve.server")

# After --shutdown-timeout, how long aborted requests get to send their last chunk.
ABORT_GRACE_SECONDS = 5.0
# After a tensor-parallel group fails, how long the server stays up answering 503 before it exits.
GROUP_FAILURE_GRACE = 3.0


def start_engine(state) -> None:
    """Build, warm and hand over the engine, timing each phase."""
    ph = state.phases
    # "import": everything before the first phase: the interpreter, torch, sanic, the app.
    age = process_age()
    ph.seconds["import"] = age if age is not None else time.time() - state.t_start
    from pyserve.engine.async_engine import AsyncLLMEngine

    built_at = []

    reports = []

    def build():  # on the engine's own thread (see async_engine.py for why)
        engine = build_engine(state.args, ph)
        with ph.phase("warmup"):
            warm_up(engine)
            reports.extend(engine.rank_reports() or ())  # every rank has warmed up when this returns
        ph.current = "engine"
        built_at.append(time.perf_counter())
        return engine

    engine = AsyncLLMEngine(build)
    baseline = engine.stats()
    ph.seconds["engine"] = time.perf_counter() - built_at[0]  # handing the engine to the event loop
    state.metrics.attach(engine, baseline, {"block_size": engine.block_size,
                                            "num_gpu_blocks": engine.kv_cache_tokens // engine.block_size})
    state.metrics.set_startup(ph.seconds)
    if reports:
        state.metrics.set_rank_startup(reports)
        for phase in reports[0]:
            slowest = max(range(len(reports)), key=lambda r: reports[r].get(phase, 0.0))
            log.info("startup %s by rank: %s (slowest: rank %d)", phase, ", ".join(
                f"{r} {rep.get(phase, 0.0):.2f} s" for r, rep in enumerate(reports)), slowest)
    state.engine = engine
    state.ready_seconds = process_age() or (time.time() - state.t_start)
    if engine.kv_cache_tokens < engine.max_model_len:
        log.warning("the KV cache holds %d tokens, less than the max model length %d: a request that needs "
                    "more (a chat without max_tokens, say) gets 400; raise --kv-cache-memory or lower "
                    "--max-model-len", engine.kv_cache_tokens, engine.max_model_len)
    if not state.chat_template:
        log.warning("the model has no chat template: /v1/chat/completions will answer 400 (see --chat-template)")


def install(app, state) -> None:
    """Startup before serving, signal handlers once serving, engine shutdown after."""
    args = state.args

    @app.before_server_start
    async def _load(app):  # noqa: ARG001
        try:
            start_engine(state)
        except StartupError as e:
            log.error("%s", e)
            die(1)
        except BaseException as e:  # noqa: BLE001
            log.error("startup failed in phase %r: %s: %s", state.phases.current, type(e).__name__, e)
            die(1)
        ph = state.phases.seconds
        log.info("startup phases: %s", ", ".join(f"{k} {v:.2f} s" for k, v in ph.items()))
        log.info("serving %s on http://%s:%d", state.names[0], args.host, args.port)
        log.info("ready in %.2f s", state.ready_seconds)

    @app.after_server_start
    async def _signals(app):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _drain, app, state, sig)
        if state.engine is not None and state.engine.tensor_parallel_size > 1:
            threading.Thread(target=_exit_when_group_fails, args=(state,), name="pyserve-tp-watch", daemon=True).start()

    @app.after_server_stop
    async def _stop(app):  # noqa: ARG001
        if state.engine is not None:
            state.engine.shutdown()


def _drain(app, state, sig) -> None:
    """SIGTERM/SIGINT: new requests get 503, running ones get --shutdown-timeout to finish,
    then the server stops (exit 0). A second signal stops at once."""
    if state.draining:
        app.stop(terminate=False)
        return
    state.draining = True
    timeout = state.args.shutdown_timeout
    log.info("%s: draining %d request(s), up to %.0f s", signal.Signals(sig).name, state.inflight, timeout)

    async def wait_inflight(deadline: float) -> None:
        while state.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def wait_then_stop():
        await wait_inflight(time.monotonic() + timeout)
        if state.inflight:
            # Aborted requests still end properly: finish_reason "abort", then [DONE].
            log.warning("shutdown timeout: aborting %d request(s)", len(state.request_ids))
            for rid in list(state.request_ids):
                state.engine.abort(rid)
            await wait_inflight(time.monotonic() + ABORT_GRACE_SECONDS)
        app.stop(terminate=False)

    app.add_task(wait_then_stop())


def _exit_when_group_fails(state) -> None:
    """Tensor parallelism: a group that lost a rank cannot serve again, so once the engine has died (its
    ranks already stopped, open streams given the error) the server answers /health 503 for
    GROUP_FAILURE_GRACE seconds, for clients and probes to see why, and exits 1."""
    while state.engine.dead is None:
        time.sleep(0.2)
    log.error("the tensor-parallel group has failed (%s); exiting in %.0f s", state.engine.dead, GROUP_FAILURE_GRACE)
    time.sleep(GROUP_FAILURE_GRACE)
    die(1)


def die(code: int) -> None:
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()
    sys.stderr.flush()
    os._exit(code)
