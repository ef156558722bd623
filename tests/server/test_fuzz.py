"""Hypothesis-generated bodies against the real server: never a 5xx, errors in OpenAI's shape,
and the engine still serves (and holds no running request) afterwards."""

from __future__ import annotations

import math
import re
import time

import pytest

from .conftest import http  # noqa: E402  (urllib: httpx is not installed in this venv)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

COMMON = ["model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream", "stream_options",
          "stop", "stop_token_ids", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "logit_bias", "logprobs", "ignore_eos", "min_tokens", "skip_special_tokens", "user", "prompt_logprobs",
          "truncate_prompt_tokens", "return_token_ids", "cache_salt", "priority"]
STRUCTURED = ["response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
              "guided_grammar"]
COMPLETION_FIELDS = COMMON + STRUCTURED + ["prompt", "echo", "best_of", "suffix"]
CHAT_FIELDS = COMMON + STRUCTURED + ["messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
                                     "parallel_tool_calls", "add_generation_prompt", "chat_template_kwargs"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.integers(min_value=-3, max_value=40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["NaN", "nan", "Infinity", "-Infinity", "1e999", "-0", "", "0", "1", "hi", "\x00", "\u202e"]),
    st.text(max_size=20),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                           "content": st.one_of(st.text(max_size=30), values)}), max_size=3)
prompts = st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 60000), max_size=8),
                    st.lists(st.text(max_size=10), max_size=3), values)
small_max = st.one_of(st.integers(min_value=1, max_value=3), values)


plausible = st.one_of(st.none(), st.booleans(), st.integers(0, 3), st.floats(0, 1.5), st.text(max_size=5))
valid_prompt = st.one_of(st.text(min_size=1, max_size=20), st.lists(st.integers(0, 1000), min_size=1, max_size=5))
valid_messages = st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=20)}),
                          min_size=1, max_size=2)


def _bodies(fields, extra_key, extra_value, valid_value):
    junk = st.dictionaries(st.sampled_from(fields) | st.text(max_size=10), values, max_size=6)

    @st.composite
    def body(draw):
        if draw(st.booleans()):  # anything at all
            b = draw(junk)
            if draw(st.booleans()):
                b[extra_key] = draw(extra_value)
            b["max_tokens"] = draw(small_max)
        else:  # a valid prompt plus a few plausible fields: these reach the engine
            b = draw(st.dictionaries(st.sampled_from(fields), plausible, max_size=3))
            b[extra_key] = draw(valid_value)
            b["max_tokens"] = draw(st.integers(1, 3))
        b.pop("max_completion_tokens", None)  # keep accepted requests short
        b.pop("min_tokens", None)
        if isinstance(b.get("n"), int) and not isinstance(b.get("n"), bool) and b["n"] > 2:
            b["n"] = 2
        return b
    return body()


def _check_response(status, payload):
    assert status < 500, payload
    if status >= 300:
        err = payload["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)


def _post(url, body):
    import json
    try:
        raw = json.dumps(body, allow_nan=False).encode()
    except (ValueError, OverflowError):
        raw = json.dumps(body).encode()  # NaN/Infinity literals: not JSON, must be a 400
    status, payload = http("POST", url, raw=raw)
    hypothesis.event(f"status {status}")
    _check_response(status, payload)


SETTINGS = dict(max_examples=75, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@settings(**SETTINGS)
@given(body=_bodies(COMPLETION_FIELDS, "prompt", prompts, valid_prompt))
def test_fuzz_completions(server, body):
    _post(server.url + "/v1/completions", body)


@settings(**SETTINGS)
@given(body=_bodies(CHAT_FIELDS, "messages", messages, valid_messages))
def test_fuzz_chat(server, body):
    _post(server.url + "/v1/chat/completions", body)


# Plausible shapes of the grammar and tool fields, so that fuzzing reaches the compilers and parsers.
schemas = st.recursive(st.sampled_from([{"type": "string"}, {"type": "integer"}, {"type": "bogus"}, {}, True,
                                        {"enum": []}, {"$ref": "#/nowhere"}, {"pattern": "("}]),
                       lambda inner: st.one_of(st.fixed_dictionaries({"type": st.just("object"),
                                                                      "properties": st.dictionaries(
                                                                          st.text(max_size=5), inner, max_size=3)}),
                                               st.fixed_dictionaries({"type": st.just("array"), "items": inner}),
                                               st.fixed_dictionaries({"anyOf": st.lists(inner, max_size=3)})),
                       max_leaves=6)
structured = st.one_of(
    st.fixed_dictionaries({"response_format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "x"])}),
        st.fixed_dictionaries({"type": st.just("json_schema"),
                               "json_schema": st.fixed_dictionaries({"name": st.text(max_size=5),
                                                                     "schema": st.one_of(schemas, values)})}),
        values)}),
    st.fixed_dictionaries({"structured_outputs": st.one_of(
        st.fixed_dictionaries({"json": st.one_of(schemas, values)}),
        st.fixed_dictionaries({"regex": st.one_of(st.text(max_size=12), st.sampled_from(["(", "a{99999}", "[a-"]))}),
        st.fixed_dictionaries({"choice": st.lists(st.text(max_size=6), max_size=3)}),
        st.fixed_dictionaries({"grammar": st.one_of(st.text(max_size=20),
                                                    st.just('start: "a" b\nb: /[0-9]+/'))}),
        values)}))
tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "x"]),
                              "function": st.one_of(st.fixed_dictionaries({"name": st.text(max_size=6),
                                                                           "parameters": schemas}), values)})
tools_fields = st.fixed_dictionaries({
    "tools": st.one_of(st.lists(tool, max_size=2), values),
    "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required", "x"]), values,
                             st.fixed_dictionaries({"type": st.just("function"),
                                                    "function": st.fixed_dictionaries({"name": st.text(max_size=6)})})),
    "parallel_tool_calls": st.one_of(st.booleans(), values)})


@settings(**SETTINGS)
@given(extra=st.one_of(structured, tools_fields), endpoint=st.sampled_from(["completions", "chat"]),
       stream=st.booleans())
def test_fuzz_structured_and_tools(server, extra, endpoint, stream):
    base = ({"prompt": "Hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    _post(server.url + f"/v1/{'chat/' if endpoint == 'chat' else ''}completions",
          {**base, **extra, "max_tokens": 3, "stream": stream})


def test_still_serving_after_fuzz(server):
    status, body = http("POST", server.url + "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert status == 200 and body["choices"][0]["message"]["content"] is not None
    assert http("GET", server.url + "/health")[0] == 200
    deadline = time.monotonic() + 10
    while True:
        m = re.search(r"^pyserve:num_requests_running(?:\{[^}]*\})? (\S+)$", http("GET", server.url + "/metrics")[1], re.M)
        assert m, "pyserve:num_requests_running missing from /metrics"
        if math.isclose(float(m.group(1)), 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert float(m.group(1)) == 0
