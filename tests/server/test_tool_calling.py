"""Tool calling and reasoning output over HTTP with the official openai SDK, on a tiny random Qwen3
model served with Qwen3's real template, `--enable-auto-tool-choice --tool-call-parser hermes
--reasoning-parser qwen3`. Forced tool choices ("required", a named function) are enforced by the
grammar, so their calls parse and validate whatever the weights; "auto" is checked by forcing the
model's text into Hermes' format with a regex and reading it back through the parser."""

from __future__ import annotations

import json

import pytest

from .conftest import Server, http
from .tiny_qwen import make_tiny_qwen

openai = pytest.importorskip("openai")
from pydantic import BaseModel, Field  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "integer", "minimum": -12, "maximum": 14}}, "required": ["zone"],
        "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
# Text in Hermes' tool-call format, for a regex to force out of the random model.
HERMES = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,8}", "unit": "celsius"\}\}\n</tool_call>'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen3-tools")
    make_tiny_qwen(folder)
    s = Server("--model", str(folder), "--served-model-name", "tiny", "--enable-auto-tool-choice",
               "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3").wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def c(tiny):
    return openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="x", max_retries=0, timeout=300)


def _valid_args(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and len(args["city"]) <= 10
        assert args["unit"] in ("celsius", "fahrenheit")
    else:
        assert name == "get_time" and isinstance(args["zone"], int) and -12 <= args["zone"] <= 14


def _create(c, **kw):
    kw = {"max_tokens": 300, "temperature": 1, **kw}
    return c.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                     extra_body={**NO_THINKING, **kw.pop("extra_body", {})}, **kw)


def _finished_calls(choices) -> list:
    """The choices that ended their calls; a random model may instead wander to max_tokens."""
    done = [ch for ch in choices if ch.finish_reason != "length"]
    assert done and all(ch.finish_reason == "tool_calls" for ch in done), choices
    return done


def test_named_tool_choice(c):
    r = _create(c, tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=1, n=3)
    for choice in _finished_calls(r.choices):
        (call,) = choice.message.tool_calls
        assert call.id and call.type == "function" and call.function.name == "get_weather"
        _valid_args(call.function.name, call.function.arguments)


def test_required_tool_choice(c):
    r = _create(c, tool_choice="required", seed=2, n=4)
    ids = set()
    done = _finished_calls(r.choices)
    for choice in done:
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            _valid_args(call.function.name, call.function.arguments)
            ids.add(call.id)
    assert len(ids) == sum(len(ch.message.tool_calls) for ch in done)  # unique


def test_parallel_tool_calls_false_gives_one_call(c):
    r = _create(c, tool_choice="required", parallel_tool_calls=False, seed=3, n=4)
    for choice in _finished_calls(r.choices):
        assert len(choice.message.tool_calls) == 1, choice


def test_tool_choice_none_gives_no_calls(c):
    """Even text in the parser's format stays text."""
    r = _create(c, tool_choice="none", seed=4, extra_body={"structured_outputs": {"regex": HERMES}})
    choice = r.choices[0]
    assert not choice.message.tool_calls and choice.finish_reason == "stop"
    assert choice.message.content.startswith('<tool_call>\n{"name": "get_weather"')


def _accumulate(stream):
    """Per choice: streamed content, reasoning, and tool calls rebuilt from their deltas."""
    out: dict[int, dict] = {}
    for chunk in stream:
        for ch in chunk.choices:
            acc = out.setdefault(ch.index, {"content": "", "reasoning": "", "calls": {}, "finish": None})
            d = ch.delta
            acc["content"] += d.content or ""
            acc["reasoning"] += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                call = acc["calls"].get(tc.index)
                if call is None:  # a call's first delta names it
                    assert tc.id and tc.function.name and tc.type == "function"
                    call = acc["calls"][tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                else:
                    assert not tc.id or tc.id == call["id"]
                call["arguments"] += tc.function.arguments or ""
            acc["finish"] = ch.finish_reason or acc["finish"]
    return out


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_tool_calls_equal_whole(c, tool_choice):
    kw = dict(tool_choice=tool_choice, seed=5, n=2)
    whole = _create(c, **kw)
    streamed = _accumulate(_create(c, stream=True, **kw))
    for choice in _finished_calls(whole.choices):
        acc = streamed[choice.index]
        assert acc["finish"] == choice.finish_reason
        calls = [acc["calls"][i] for i in sorted(acc["calls"])]
        assert [(x["name"], x["arguments"]) for x in calls] == \
               [(t.function.name, t.function.arguments) for t in choice.message.tool_calls]




@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_hermes_calls(c, stream):
    """tool_choice auto (the default with tools): what the model writes goes through --tool-call-parser."""
    kw = dict(seed=6, extra_body={"structured_outputs": {"regex": r"Sure\. " + HERMES}})
    if not stream:
        choice = _create(c, **kw).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure. "
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        _valid_args(call.function.name, call.function.arguments)
        return
    whole = _create(c, **kw).choices[0]
    acc = _accumulate(_create(c, stream=True, **kw))[0]
    assert acc["finish"] == "tool_calls" and acc["content"] == whole.message.content
    assert [(x["name"], x["arguments"]) for x in acc["calls"].values()] == \
           [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]


class GetWeather(BaseModel):
    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=7)


def test_pydantic_function_tool_with_parse(c):
    tool = openai.pydantic_function_tool(GetWeather)
    r = c.chat.completions.parse(model="tiny", messages=ASK, tools=[tool], temperature=1, seed=7, max_tokens=200,
                                 tool_choice={"type": "function", "function": {"name": "GetWeather"}},
                                 extra_body=NO_THINKING)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_follow_up_turn_with_tool_results(c, tiny):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    r = c.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length")
    status, body = http("POST", tiny.url + "/tokenize", {"messages": messages, "tools": TOOLS})
    assert status == 200
    prompt = http("POST", tiny.url + "/detokenize", {"tokens": body["tokens"]})[1]["prompt"]
    # Qwen3's template: the arguments as an object (tojson), the result inside <tool_response>.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
        in prompt
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in prompt
    assert '"name": "get_time"' in prompt  # the tools, in the system turn


def _thinking_bias(tiny) -> dict:
    """Biases that make the random model open with <think>, as Qwen3 does, and soon close it."""
    ids = []
    for tag in ("<think>", "</think>"):
        status, body = http("POST", tiny.url + "/tokenize", {"prompt": tag, "add_special_tokens": False})
        assert status == 200 and len(body["tokens"]) == 1
        ids += body["tokens"]
    return {str(ids[0]): 9.0, str(ids[1]): 6.0}


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_is_split_from_the_answer(c, tiny, stream):
    """Thinking on (Qwen3's default): the text before </think> is reasoning_content, the rest content;
    checked against the raw text of the same prompt, seed and bias through /v1/completions."""
    bias = _thinking_bias(tiny)
    kw = dict(model="tiny", messages=ASK, max_tokens=60, temperature=1, seed=8, logit_bias=bias)
    status, tok = http("POST", tiny.url + "/tokenize", {"messages": ASK})
    raw = c.completions.create(model="tiny", prompt=tok["tokens"], max_tokens=60, temperature=1, seed=8,
                               logit_bias=bias).choices[0].text
    assert raw.startswith("<think>") and "</think>" in raw
    thought, _, answer = raw.partition("</think>")
    if stream:
        acc = _accumulate(c.chat.completions.create(stream=True, **kw))[0]
        reasoning, content = acc["reasoning"] or None, acc["content"] or None
    else:
        m = c.chat.completions.create(**kw).choices[0].message
        reasoning, content = m.reasoning_content, m.content
    assert (reasoning or "") == thought.removeprefix("<think>")
    assert (content or "") == answer


def test_response_format_applies_after_thinking(c, tiny):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = c.chat.completions.create(model="tiny", messages=ASK, max_tokens=200, temperature=1, seed=9, n=3,
                                  logit_bias=_thinking_bias(tiny),
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": schema}})
    for choice in r.choices:
        if choice.finish_reason == "stop":
            assert json.loads(choice.message.content)["ok"] in (True, False)
            assert choice.message.reasoning_content is None or "</think>" not in choice.message.reasoning_content


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": {"x": 1}}]}, "messages"),
])
def test_bad_tool_fields_are_400(tiny, body, param):
    status, r = http("POST", tiny.url + "/v1/chat/completions", {"messages": ASK, "max_tokens": 3, **body})
    assert status == 400 and r["error"]["param"] == param, r
