"""The path every generating endpoint shares: add an API request's prompts to the engine (all or
none), stream their outputs merged as they come, time them for the metrics, abort whatever is left
when the client goes, and count usage. Endpoints only shape choices."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pyserve.engine.async_engine import EngineDeadError, RequestFailedError
from pyserve.errors import InvalidRequestError
from pyserve.outputs import CompletionOutput, RequestOutput
from pyserve.server.errors import APIError, stream_error_body
from pyserve.server.responses import SSE_DONE, sse, usage


class _Tracker:
    """Per engine request: timing for the metrics."""

    def __init__(self):
        self.arrival = time.perf_counter()
        self.first: float | None = None
        self.done = False


@dataclass
class ChoiceEvent:
    """Something new for one choice: `choice.delta_*` is what it adds since its previous event."""

    prompt_index: int
    output: RequestOutput
    choice: CompletionOutput
    first: bool  # this choice's first event


class Generation:
    """The engine requests behind one API request, one per prompt (each with its n samples)."""

    def __init__(self, state, request_ids: list[str], streams: list):
        self.state = state
        self.request_ids = request_ids
        self._streams = streams
        self._trackers = [_Tracker() for _ in request_ids]

    @classmethod
    async def start(cls, state, base_id: str, prompts: list, params, prompt_param: str) -> "Generation":
        """Validate and add every prompt, or none (a bad one aborts those already added). Prompts are
        tokenized off the event loop, which keeps serving (/health included) meanwhile."""
        state.check_queue(len(prompts))
        engine = state.engine
        rids, streams = [], []
        state.preparing += len(prompts)  # until they are in request_ids: a burst must not all pass check_queue
        try:
            prepared = [await engine.prepare(prompt, params) for prompt in prompts]
            for i, prep in enumerate(prepared):
                rid = f"{base_id}-{i}"
                streams.append(engine.add_request(rid, None, prepared=prep))
                rids.append(rid)
        except InvalidRequestError as e:
            for rid in rids:
                engine.abort(rid)
            raise APIError.invalid(e, prompt_param) from None
        except EngineDeadError as e:
            for rid in rids:
                engine.abort(rid)
            raise APIError.engine_dead(e) from None
        finally:
            state.preparing -= len(prompts)
        state.request_ids.update(rids)
        return cls(state, rids, streams)

    def release(self) -> None:
        """Give the requests back unread (the client left before the stream started)."""
        self.state.request_ids.difference_update(self.request_ids)
        for rid in self.request_ids:
            self.state.engine.abort(rid)

    async def finals(self) -> list[RequestOutput]:
        """Each prompt's last output, in prompt order."""
        finals: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(self._merged()) as merged:
            async for i, out in merged:
                if out.finished:
                    finals[i] = out
        return [finals[i] for i in range(len(self.request_ids))]

    async def choice_events(self, always_first: bool = False) -> AsyncIterator[ChoiceEvent]:
        """One event per choice that has something new (text, tokens, or its end); a finished choice
        has no more. always_first: a choice's first output is an event even with nothing new."""
        seen: set[tuple[int, int]] = set()
        ended: set[tuple[int, int]] = set()
        async with contextlib.aclosing(self._merged()) as merged:
            async for i, out in merged:
                for o in out.outputs:
                    key = (i, o.index)
                    if key in ended:
                        continue
                    first = key not in seen
                    if not (o.delta_text or o.delta_token_ids or o.finished or (first and always_first)):
                        continue
                    seen.add(key)
                    if o.finished:
                        ended.add(key)
                    yield ChoiceEvent(i, out, o, first)

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from every engine stream as they come; on exit, every request that
        has not finished is aborted (and counted as such)."""
        state, rids, iters, trackers = self.state, self.request_ids, self._streams, self._trackers
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
                    self._track(trackers[0], out)
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
                self._track(trackers[i], item)
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            state.request_ids.difference_update(rids)
            for rid, tr in zip(rids, trackers):
                if not tr.done:  # the client left (or an error): abort, and count it
                    state.engine.abort(rid)
                    tr.done = True
                    state.metrics.record_request("abort", tr.arrival, tr.first, time.perf_counter(), 0)
            for it in iters:
                with contextlib.suppress(BaseException):
                    await it.aclose()

    def _track(self, tr: _Tracker, out: RequestOutput) -> None:
        now = time.perf_counter()
        if tr.first is None and any(o.token_ids for o in out.outputs):
            tr.first = now
        if out.finished and not tr.done:
            tr.done = True
            self.state.metrics.record_request(out.outputs[0].finish_reason, tr.arrival, tr.first, now,
                                              sum(len(o.token_ids) for o in out.outputs))


class UsageCounter:
    """Token counts across a request's prompts and choices, as of the latest outputs."""

    def __init__(self):
        self._prompt: dict[int, int] = {}
        self._cached: dict[int, int] = {}
        self._generated: dict[tuple[int, int], int] = {}

    def update(self, prompt_index: int, out: RequestOutput) -> None:
        self._prompt[prompt_index] = len(out.prompt_token_ids)
        self._cached[prompt_index] = out.num_cached_tokens
        for o in out.outputs:
            self._generated[(prompt_index, o.index)] = len(o.token_ids)

    @property
    def seen(self) -> bool:
        return bool(self._prompt)

    def usage(self) -> dict:
        return usage(sum(self._prompt.values()), sum(self._generated.values()), sum(self._cached.values()))

    @classmethod
    def of(cls, outputs: list[RequestOutput]) -> dict:
        counter = cls()
        for i, out in enumerate(outputs):
            counter.update(i, out)
        return counter.usage()


async def respond_sse(request, generation: Generation):
    """Start the event stream and send its headers now, so that a request waiting in the queue is
    already a 200 to its client; if that fails (the client is gone), give the requests back."""
    try:
        resp = await request.respond(content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await resp.send(b"")
        return resp
    except BaseException:
        generation.release()
        raise


@contextlib.asynccontextmanager
async def event_stream(resp):
    """The body of a stream: an engine failure on the way becomes an error event; it always ends with
    [DONE]."""
    try:
        yield
    except (EngineDeadError, RequestFailedError, ValueError) as e:
        await resp.send(sse(stream_error_body(e)))
    await resp.send(SSE_DONE)
    await resp.eof()


async def off_loop_if(heavy: bool, fn, *args):
    """fn(*args), on a worker thread when heavy: logprobs of a whole prompt (2048 positions x 21
    tokens) take ~0.2 s to decode and shape, which the event loop must not wait for."""
    return await asyncio.to_thread(fn, *args) if heavy else fn(*args)
