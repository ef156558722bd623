"""POST /v1/chat/completions: messages through the chat template, then generation, streamed or
not; OpenAI's chat shapes with vLLM's extras."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid

from pyserve.engine.chat_template import ChatTemplateError, messages_for_template, render_chat
from pyserve.errors import InvalidRequestError
from pyserve.sampling_params import SamplingParams
from pyserve.server import logprobs as lpfmt
from pyserve.server import protocol
from pyserve.server.errors import APIError
from pyserve.server.chat_output import ChatOutput, ChoiceStreamer
from pyserve.server.generation import Generation, UsageCounter, event_stream, off_loop_if, respond_sse
from pyserve.server.responses import ResponseHead, json_response, usage
from pyserve.structured.spec import GrammarSpec


async def chat_prompt(state, req: protocol.ChatRequest) -> tuple[str, list[int]]:
    """The chat's prompt as text and tokens, rendered and tokenized off the event loop."""
    text = await state.engine.run_off_loop(_render, state, req)
    try:
        return text, await state.engine.encode(text, add_special_tokens=False)
    except InvalidRequestError as e:
        raise APIError.invalid(e, "messages") from None


def _render(state, req: protocol.ChatRequest) -> str:
    tok = state.tokenizer
    tools = req.tools.template_tools if req.tools is not None else None
    try:
        # As transformers: a special token the tokenizer lacks is left undefined, not "".
        specials = {name: tok.token(tid) for name, tid in (("bos_token", tok.bos_token_id),
                                                            ("eos_token", tok.eos_token_id)) if tid is not None}
        return render_chat(state.chat_template, messages_for_template(req.messages), req.add_generation_prompt,
                           tools=tools, **specials, **(req.chat_template_kwargs or {}))
    except ChatTemplateError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None


def _constrained(state, req: protocol.ChatRequest, prompt_ids: list[int]) -> SamplingParams:
    """The request's sampling parameters with its grammar: a forced tool call's, else the response
    format's; behind a reasoning parser, applied once the thinking has ended."""
    params = req.params
    spec = params.structured_outputs
    schema = req.tools.json_schema() if req.tools is not None else None
    if schema is not None:
        spec = GrammarSpec.json_schema(schema, "tool_choice")
    if spec is None:
        return params
    after = None
    if state.reasoning is not None:
        tokens = state.reasoning.tokens(state.tokenizer)
        if tokens is not None and not tokens.is_reasoning_end(prompt_ids):
            after = tokens.end_id
    return dataclasses.replace(params, structured_outputs=spec, structured_outputs_after=after)


def register(app, state, api) -> None:
    auto_tool_parser = state.args.tool_call_parser if state.args.enable_auto_tool_choice else None

    @app.post("/v1/chat/completions")
    @api
    async def chat(request):
        state.check_live()
        req = protocol.parse_chat(protocol.json_body(request))
        model = state.check_model(req.model)
        output = ChatOutput(state.reasoning, req.tools, auto_tool_parser)  # 400 for "auto" without a parser
        prompt_text, ids = await chat_prompt(state, req)
        output.prompt_text = prompt_text  # where the output starts (inside the thinking or not)
        head = ResponseHead(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", int(time.time()), model)
        gen = await Generation.start(state, head.id, [ids], _constrained(state, req, ids), "messages")
        shape = _Choices(state, req, output)
        if not req.stream:
            (final,) = await gen.finals()
            body = head.body([shape.choice(o) for o in final.outputs], usage=UsageCounter.of([final]))
            if final.prompt_logprobs is not None:
                body["prompt_logprobs"] = await off_loop_if(True, lpfmt.prompt_logprobs, shape.text,
                                                            final.prompt_logprobs)
            if req.return_token_ids:
                body["prompt_token_ids"] = final.prompt_token_ids
            return json_response(body)

        resp = await respond_sse(request, gen)
        head.object = "chat.completion.chunk"
        for k in range(req.params.n):  # one choice per chunk, as OpenAI and vLLM stream n > 1
            await resp.send(head.chunk([{"index": k, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}],
                                       usage(len(ids), 0) if req.continuous_usage else None,
                                       **({"prompt_token_ids": ids} if req.return_token_ids and k == 0 else {})))
        counter = UsageCounter()
        async with event_stream(resp), contextlib.aclosing(gen.choice_events()) as events:
            async for ev in events:
                counter.update(0, ev.output)
                for choice in shape.deltas(ev.choice):
                    await resp.send(head.chunk([choice], counter.usage() if req.continuous_usage else None))
            if req.include_usage and counter.seen:
                await resp.send(head.chunk([], counter.usage()))
        return None


class _Choices:
    """Choices in the chat shape, whole or as stream deltas."""

    def __init__(self, state, req: protocol.ChatRequest, output: ChatOutput):
        self.req = req
        self.output = output
        self.text = lpfmt.TokenText(state.tokenizer)
        self.streamers: dict[int, ChoiceStreamer] = {}

    def _logprobs(self, ids, lps, tops) -> dict | None:
        if self.req.top_logprobs is None:
            return None
        return lpfmt.chat_logprobs(self.text, ids, lps, tops)

    def choice(self, o) -> dict:
        message, finish_reason = self.output.message(o.text, o.finish_reason)
        choice = {"index": o.index, "message": message,
                  "logprobs": self._logprobs(o.token_ids, o.logprobs or [], o.top_logprobs),
                  "finish_reason": finish_reason, "stop_reason": o.stop_reason}
        if self.req.return_token_ids:
            choice["token_ids"] = o.token_ids
        return choice

    def deltas(self, o) -> list[dict]:
        """This output's chunks for its choice: one per delta fragment (text, reasoning, a tool call's
        start or arguments); the logprobs and token ids ride on the first, the finish on the last."""
        streamer = self.streamers.get(o.index)
        if streamer is None:
            streamer = self.streamers[o.index] = self.output.streamer()
        fragments = streamer.feed(o.delta_text, o.finished)
        lps = self._logprobs(o.delta_token_ids, o.delta_logprobs, o.delta_top_logprobs)
        if not fragments:
            if not (o.finished or o.delta_token_ids):
                return []
            fragments = [{}]
        choices = []
        for k, delta in enumerate(fragments):
            last = k == len(fragments) - 1
            choice = {"index": o.index, "delta": delta, "logprobs": lps if k == 0 else None,
                      "finish_reason": streamer.finish_reason(o.finish_reason) if last else None,
                      "stop_reason": o.stop_reason if last and o.finished else None}
            if self.req.return_token_ids:
                choice["token_ids"] = o.delta_token_ids if k == 0 else []
            choices.append(choice)
        return choices
