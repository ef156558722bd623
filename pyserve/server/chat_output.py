"""How a chat choice's generated text becomes an assistant message: the thinking split off
(`--reasoning-parser`) into `reasoning_content`, then tool calls parsed out of the answer (the
`--tool-call-parser` for tool_choice "auto", the grammar's JSON for "required" or a named function),
the rest `content`. Whole, for a response; delta by delta, for a stream, where the concatenated
fragments equal the whole."""

from __future__ import annotations

from pyserve.server.reasoning import ReasoningParser
from pyserve.server.tool_schemas import ToolRequest


class ChatOutput:
    """Per request: the parsers that apply and where the output starts (inside the thinking or not)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolRequest | None, tool_call_parser: str | None):
        self.reasoning = reasoning
        self.prompt_text = ""  # the rendered prompt, once known
        self.tools = tools
        self.tool_parser = tools.output_parser(tool_call_parser) if tools is not None else None

    def message(self, text: str, engine_reason: str | None) -> tuple[dict, str | None]:
        """The whole message and the choice's finish_reason."""
        message: dict = {"role": "assistant"}
        content: str | None = text
        if self.reasoning is not None:
            message["reasoning_content"], content = self.reasoning.split(text, prompt=self.prompt_text)
        calls = []
        if self.tool_parser is not None:
            content, calls = self.tool_parser.extract(content or "", self.tools.max_calls)
        # With a parser, an answer of nothing (or only whitespace) is null, as vLLM sends it.
        message["content"] = content if (self.reasoning or self.tool_parser) else text
        if calls:
            message["tool_calls"] = [c.to_dict() for c in calls]
        return message, self.finish_reason(engine_reason, bool(calls))

    def streamer(self) -> "ChoiceStreamer":
        return ChoiceStreamer(self)

    def finish_reason(self, engine_reason: str | None, tools_called: bool) -> str | None:
        if self.tools is None:
            return engine_reason
        return self.tools.finish_reason(engine_reason, tools_called)


class ChoiceStreamer:
    """One choice's text deltas in, OpenAI delta fragments out (`content`, `reasoning_content`,
    `tool_calls`)."""

    def __init__(self, shape: ChatOutput):
        self.shape = shape
        self.reasoning = shape.reasoning.streamer(prompt=shape.prompt_text) if shape.reasoning else None
        self.tools = shape.tool_parser.streamer(shape.tools.max_calls) if shape.tool_parser else None

    def feed(self, delta: str, last: bool) -> list[dict]:
        out: list[dict] = []
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(delta)
            if last:
                r2, c2 = self.reasoning.finish()
                reasoning = (reasoning or "") + (r2 or "") or None
                content = (content or "") + (c2 or "") or None
            if reasoning:
                out.append({"reasoning_content": reasoning})
        else:
            content = delta
        if self.tools is not None:
            out += self.tools.feed(content or "")
            if last:
                out += self.tools.finish()
        elif content:
            out.append({"content": content})
        return out

    def finish_reason(self, engine_reason: str | None) -> str | None:
        if engine_reason is None:
            return None
        return self.shape.finish_reason(engine_reason, self.tools is not None and self.tools.tools_called)
