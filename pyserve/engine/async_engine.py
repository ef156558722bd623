"""The engine behind an asyncio server: the model steps in a worker thread,
so the event loop keeps serving HTTP while batches run.

Requests and aborts reach the thread through a thread-safe inbox; outputs
come back to each request's asyncio queue with call_soon_threadsafe. The
event loop never waits on a step, nor on tokenizing a prompt: `prepare` runs
that on a worker thread (the tokenizer releases the GIL). A request that fails
inside the engine raises RequestFailedError from its own stream only. If a step
as a whole raises, the engine is marked dead, every open stream gets the error,
and `/health` can say so.

The engine is best built on that same thread (pass a builder, not an engine).
Every thread that runs a parallel torch op gets its own OpenMP thread pool,
and once a process has more OpenMP threads than cores, libgomp stops
spinning between parallel regions and puts its threads to sleep after each
one: a model loaded and warmed on the main thread and stepped on this one
paid ~35 µs of futex wake-ups per op on 2 cores, about 15% of the
serving throughput at concurrency 32.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from pyserve.engine.llm_engine import EngineStats, LLMEngine, RequestFailedError
from pyserve.outputs import RequestOutput
from pyserve.sampling_params import SamplingParams

log = logging.getLogger("pyserve.engine")


class EngineDeadError(RuntimeError):
    pass


__all__ = ["AsyncLLMEngine", "EngineDeadError", "RequestFailedError"]


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]):
        """engine: a built engine, or a function that builds (and warms) one on the engine thread; its
        exception, if it raises, is raised here."""
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self.dead: BaseException | None = None
        self._stopping = False
        # Tokenizing and validating prompts: one thread, so that a burst of huge prompts takes one core at
        # most from the model (which runs on its own thread), and the event loop none.
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyserve-prepare")
        build = (lambda: engine) if isinstance(engine, LLMEngine) else engine
        built = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.engine = build()
                self._stats = self.engine.stats()
            except BaseException as e:  # noqa: BLE001 - handed to the constructor's caller
                failure.append(e)
                return
            finally:
                built.set()
            self._loop()
            # Stopped or dead: the other tensor-parallel ranks go too (from this thread, which started them).
            try:
                self.engine.close(graceful=self.dead is None)
            except Exception:  # noqa: BLE001
                log.exception("stopping the tensor-parallel ranks failed")

        self._thread = threading.Thread(target=run, name="pyserve-engine", daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            raise failure[0]

    # ---- what a server reads of the model (fixed once built) -------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model.cfg.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.engine.eos_token_ids

    @property
    def block_size(self) -> int:
        return self.engine.config.block_size

    @property
    def tensor_parallel_size(self) -> int:
        return self.engine.config.tensor_parallel_size

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the whole KV cache holds."""
        return self.engine.num_blocks * self.engine.config.block_size

    # ---- called on the event loop --------------------------------------------------------------

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize off the event loop; a text too long for the context is refused untokenized."""
        return await self.run_off_loop(self.engine.encode, text, add_special_tokens)

    async def decode(self, token_ids: list[int]) -> str:
        return await self.run_off_loop(self.engine.tokenizer.decode, token_ids)

    async def run_off_loop(self, fn: Callable, *args):
        """fn(*args) on the preparation thread (tokenizing, chat templates), awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    async def prepare(self, prompt: str | list[int], params: SamplingParams | None = None):
        """Tokenize and validate off the event loop (ValueError for a bad request); the result goes to
        add_request(prepared=...)."""
        return await self.run_off_loop(self.engine.prepare_request, prompt, params)

    def add_request(self, request_id: str, prompt: str | list[int] | None,
                    params: SamplingParams | None = None, prepared=None) -> AsyncIterator[RequestOutput]:
        """Validate now (ValueError for a bad request; tokenizes on the caller's thread unless
        `prepared` comes from `prepare`), then stream outputs.
        Leaving the iterator early (client gone, task cancelled) aborts the request."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine has died: {self.dead!r}")
        if prepared is None:
            prepared = self.engine.prepare_request(prompt, params)
        q: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", request_id, prepared))
        if self.dead is not None:  # died between the check above and now: don't leave the caller waiting
            self._deliver(request_id, EngineDeadError(f"the engine has died: {self.dead!r}"))
        return self._stream(request_id, q)

    async def _stream(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    finished = True
                    if item.error_param is not None:
                        raise RequestFailedError(item.error, item.error_param)
                    raise RequestFailedError(f"request {request_id} failed in the engine: {item.error}")
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    def stats(self) -> EngineStats:
        """As of the last step (the thread publishes a snapshot)."""
        return self._stats

    def shutdown(self) -> None:
        self._stopping = True
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout=30)
        self._prep.shutdown(wait=False, cancel_futures=True)

    # ---- the worker thread ------------------------------------------------------------------------

    def _deliver(self, request_id: str, item) -> None:
        with self._streams_lock:
            entry = self._streams.get(request_id)
            if entry is not None and (isinstance(item, BaseException) or item.finished):
                del self._streams[request_id]
        if entry is not None:
            loop, q = entry
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, rid, payload = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                try:
                    self.engine.add_request(rid, None, prepared=payload)
                except ValueError as e:
                    self._deliver(rid, e)
                except Exception as e:  # noqa: BLE001 - this request's failure; the engine is untouched
                    log.error("request %s could not be added: %r", rid, e, exc_info=e)
                    self._deliver(rid, RequestFailedError(f"request {rid} failed in the engine: "
                                                          f"{type(e).__name__}: {e}"))
            elif kind == "abort":
                out = self.engine.abort(rid)
                if out is not None:
                    self._deliver(rid, out)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._drain_inbox(block=not self.engine.has_unfinished())
                if not self.engine.has_unfinished():
                    self._stats = self.engine.stats()
                    self.engine.idle()  # a lost tensor-parallel rank kills the engine even while idle
                    continue
                outputs = self.engine.step()
                self._stats = self.engine.stats()
                for out in outputs:
                    self._deliver(out.request_id, out)
            except BaseException as e:  # noqa: BLE001 - anything here kills the engine, visibly
                log.exception("engine step failed; the engine is now dead")
                self.dead = e
                with self._streams_lock:
                    rids = list(self._streams)
                for rid in rids:
                    self._deliver(rid, EngineDeadError(f"the engine has died: {e!r}"))
                return
