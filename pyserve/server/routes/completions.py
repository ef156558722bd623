"""POST /v1/completions: OpenAI's legacy completions with vLLM's extras (several prompts, echo,
logprobs, prompt_logprobs, token ids), streamed or not."""

from __future__ import annotations

import contextlib
import time
import uuid

from pyserve.server import logprobs as lpfmt
from pyserve.server import protocol
from pyserve.server.generation import Generation, UsageCounter, event_stream, off_loop_if, respond_sse
from pyserve.server.responses import ResponseHead, json_response


def register(app, state, api) -> None:
    @app.post("/v1/completions")
    @api
    async def completions(request):
        state.check_live()
        req = protocol.parse_completion(protocol.json_body(request))
        model = state.check_model(req.model)
        head = ResponseHead(f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time()), model)
        gen = await Generation.start(state, head.id, req.prompts, req.params, "prompt")
        shape = _Choices(state, req)
        if not req.stream:
            finals = await gen.finals()
            body = await off_loop_if(req.params.prompt_logprobs is not None, shape.response, head, finals)
            return json_response(body)

        resp = await respond_sse(request, gen)
        counter = UsageCounter()
        async with event_stream(resp), contextlib.aclosing(gen.choice_events(always_first=req.echo)) as events:
            async for ev in events:
                counter.update(ev.prompt_index, ev.output)
                choice = await off_loop_if(ev.first and req.echo and shape.want_lp, shape.delta, ev)
                # One choice per chunk, as OpenAI and vLLM stream n > 1 and several prompts.
                await resp.send(head.chunk([choice], counter.usage() if req.continuous_usage else None))
            if req.include_usage:
                await resp.send(head.chunk([], counter.usage()))
        return None


class _Choices:
    """Choices in the completions shape, whole or as stream deltas."""

    def __init__(self, state, req: protocol.CompletionRequest):
        self.state, self.req = state, req
        self.text = lpfmt.TokenText(state.tokenizer)
        self.want_lp = req.params.logprobs is not None
        self.sent_chars: dict[tuple[int, int], int] = {}  # text offsets for the streamed logprobs

    def _echo(self, i: int, out) -> str:
        p = self.req.prompts[i]
        return p if isinstance(p, str) and out.prompt == p else self.state.tokenizer.decode(out.prompt_token_ids)

    def _logprobs(self, out, ids, lps, tops, offset: int, echo: bool) -> dict | None:
        if not self.want_lp:
            return None
        prompt = (out.prompt_token_ids, out.prompt_logprobs) if echo and out.prompt_logprobs else None
        return lpfmt.completion_logprobs(self.text, ids, lps, tops, offset, prompt)

    def _index(self, i: int, o) -> int:
        return i * self.req.params.n + o.index

    def response(self, head: ResponseHead, finals: list) -> dict:
        req, choices = self.req, []
        for i, out in enumerate(finals):
            prompt_lps = None if out.prompt_logprobs is None else lpfmt.prompt_logprobs(self.text, out.prompt_logprobs)
            for o in out.outputs:
                choice = {"index": self._index(i, o), "text": (self._echo(i, out) if req.echo else "") + o.text,
                          "logprobs": self._logprobs(out, o.token_ids, o.logprobs or [], o.top_logprobs, 0,
                                                     req.echo),
                          "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                if prompt_lps is not None:
                    choice["prompt_logprobs"] = prompt_lps
                if req.return_token_ids:
                    choice["prompt_token_ids"] = out.prompt_token_ids
                    choice["token_ids"] = o.token_ids
                choices.append(choice)
        return head.body(choices, usage=UsageCounter.of(finals))

    def delta(self, ev) -> dict:
        req, out, o = self.req, ev.output, ev.choice
        key = (ev.prompt_index, o.index)
        echo = ev.first and req.echo
        pre = self._echo(ev.prompt_index, out) if echo else ""
        offset = 0 if echo else self.sent_chars.get(key, 0)
        choice = {"index": self._index(ev.prompt_index, o), "text": pre + o.delta_text,
                  "logprobs": self._logprobs(out, o.delta_token_ids, o.delta_logprobs, o.delta_top_logprobs,
                                             offset, echo),
                  "finish_reason": o.finish_reason, "stop_reason": o.stop_reason if o.finished else None}
        if req.return_token_ids:
            if ev.first:
                choice["prompt_token_ids"] = out.prompt_token_ids
            choice["token_ids"] = o.delta_token_ids
        self.sent_chars[key] = self.sent_chars.get(key, 0) + len(choice["text"])
        return choice
