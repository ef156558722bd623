"""Structured outputs over HTTP with the official openai SDK: OpenAI's response_format (text,
json_object, json_schema, also through `chat.completions.parse` with Pydantic models) and vLLM's
structured_outputs (json, regex, choice, grammar), on the default model and on a tiny random Qwen3
model. The grammar is applied inside the sampler, so every output must satisfy it whatever the
model's weights."""

from __future__ import annotations

import json
import re
import threading
from enum import Enum
from typing import Optional

import pytest

from .conftest import Server, http
from .tiny_qwen import make_tiny_qwen

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
from pydantic import BaseModel, Field  # noqa: E402


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


# Bounded strings and numbers: a random model's tokens wander within whatever a schema allows.
class Address(BaseModel):
    city: str = Field(max_length=12)
    zip_code: int = Field(ge=0, le=99999)


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=150)
    favourite: Color
    address: Address
    nicknames: list[str] = Field(max_length=3)
    email: Optional[str] = Field(default=None, max_length=20)


def _is_person(p: Person) -> None:
    assert isinstance(p, Person) and isinstance(p.address, Address) and p.favourite in Color


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    make_tiny_qwen(folder)
    s = Server("--model", str(folder), "--served-model-name", "tiny").wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny_client(tiny):
    return openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="x", max_retries=0, timeout=300)


def _clients(client, tiny_client):
    return (("default", client), ("tiny", tiny_client))


# The tiny model's template starts in thinking mode unless told not to; structured output here is
# about the answer, so these requests turn thinking off (Qwen3's own switch).
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_parse_pydantic(client, tiny_client, which):
    c = dict(_clients(client, tiny_client))[which]
    # Sampled, not greedy: a random model's argmax can repeat one whitespace token for good (vLLM's JSON
    # grammars allow any whitespace, as ours do).
    r = c.chat.completions.parse(model=c.models.list().data[0].id, messages=MESSAGES, response_format=Person,
                                 max_tokens=600, temperature=1, seed=1, extra_body=NO_THINKING)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    _is_person(choice.message.parsed)


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_parse_n4_sampled(client, tiny_client, which):
    c = dict(_clients(client, tiny_client))[which]
    r = c.chat.completions.parse(model=c.models.list().data[0].id, messages=MESSAGES, response_format=Person,
                                 max_tokens=600, temperature=1, n=4, seed=7, extra_body=NO_THINKING)
    assert len(r.choices) == 4
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        _is_person(choice.message.parsed)


def test_parse_streamed(client):
    """The SDK's streaming helper parses the streamed JSON into the model."""
    with client.chat.completions.stream(model=client.models.list().data[0].id, messages=MESSAGES,
                                        response_format=Person, max_tokens=400, temperature=0) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "stop"
    _is_person(final.choices[0].message.parsed)


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_streamed_json_schema_equals_whole(client, tiny_client, which):
    c = dict(_clients(client, tiny_client))[which]
    model = c.models.list().data[0].id
    rf = {"type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema(),
                                                 "strict": True}}
    kw = dict(model=model, messages=MESSAGES, response_format=rf, max_tokens=600, temperature=1, seed=3,
              extra_body=NO_THINKING)
    whole = c.chat.completions.create(**kw).choices[0].message.content
    parts, finish = [], None
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == whole
    if which == "default" or finish == "stop":  # the tiny model may wander to max_tokens
        assert finish == "stop"
        Person.model_validate_json(whole)


def test_json_object_always_loads(client, tiny_client):
    for _, c in _clients(client, tiny_client):
        r = c.chat.completions.create(model=c.models.list().data[0].id, messages=MESSAGES, max_tokens=300,
                                      response_format={"type": "json_object"}, n=3, temperature=1, seed=11,
                                      extra_body=NO_THINKING)
        for choice in r.choices:
            if choice.finish_reason == "stop":
                assert isinstance(json.loads(choice.message.content), dict)
            else:  # cut off by max_tokens mid-JSON: "length", as OpenAI says
                assert choice.finish_reason == "length"


def test_regex_choice_and_grammar_on_completions(client, tiny_client):
    for _, c in _clients(client, tiny_client):
        model = c.models.list().data[0].id
        # [0-9], not \d: the grammar's \d is Unicode's (newer than Python's), as vLLM's is.
        phone = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
        r = c.completions.create(model=model, prompt="Phone number:", max_tokens=40, temperature=1, n=3, seed=1,
                                 extra_body={"structured_outputs": {"regex": phone}})
        for ch in r.choices:
            assert re.fullmatch(phone, ch.text) and ch.finish_reason == "stop", ch
        r = c.completions.create(model=model, prompt="Yes or no?", max_tokens=10, temperature=1, n=4, seed=2,
                                 extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe not"]}})
        assert all(ch.text in ("yes", "no", "maybe not") and ch.finish_reason == "stop" for ch in r.choices)
        grammar = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[a-z]{1,6}/\n'
        r = c.completions.create(model=model, prompt="Say hi:", max_tokens=20, temperature=1, n=2, seed=3,
                                 extra_body={"structured_outputs": {"grammar": grammar}})
        for ch in r.choices:
            assert re.fullmatch(r"(hello|hi) [a-z]{1,6}", ch.text) and ch.finish_reason == "stop", ch


def test_completions_response_format_streamed(tiny_client):
    model = tiny_client.models.list().data[0].id
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    kw = dict(model=model, prompt="JSON:", max_tokens=60, temperature=1, seed=5,
              extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    whole = tiny_client.completions.create(**kw).choices[0].text
    streamed = "".join(ch.choices[0].text for ch in tiny_client.completions.create(stream=True, **kw) if ch.choices)
    assert streamed == whole
    out = json.loads(whole)
    assert set(out) == {"ok", "n"} and isinstance(out["ok"], bool) and isinstance(out["n"], int)


def test_max_tokens_mid_json_is_length(tiny_client):
    r = tiny_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, extra_body=NO_THINKING,
                                            response_format={"type": "json_schema", "json_schema": {
                                                "name": "p", "schema": Person.model_json_schema()}})
    assert r.choices[0].finish_reason == "length"


def test_logprobs_stay_the_models(tiny_client):
    """The mask chooses the token, not its logprob: top logprobs are the raw model's, the same as without
    a grammar, while the sampled token is one the grammar allows."""
    kw = dict(model="tiny", prompt="x", max_tokens=1, temperature=0, logprobs=5)
    free = tiny_client.completions.create(**kw).choices[0]
    r = tiny_client.completions.create(**kw, extra_body={"structured_outputs": {"choice": ["zq"]}}).choices[0]
    assert "zq".startswith(r.text) and r.text and r.text != free.text
    top = r.logprobs.top_logprobs[0]
    for token, lp in free.logprobs.top_logprobs[0].items():
        assert top[token] == pytest.approx(lp, abs=1e-5)
    assert r.logprobs.token_logprobs[0] < free.logprobs.token_logprobs[0]


BAD = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
        "response_format"),
       ({"response_format": {"type": "yaml"}}, "response_format"),
       ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
       # Valid, but its one character needs a byte (0xF1) SmolLM2's vocabulary has no token for: found
       # while generating (found by the fuzz test), still the request's fault.
       ({"structured_outputs": {"regex": "\U00040000"}}, "structured_outputs.regex"),
       ({"structured_outputs": {"grammar": "start: ??? nonsense"}}, "structured_outputs.grammar"),
       ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
       ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
       ({"structured_outputs": {"json": {"type": "object"}}, "response_format": {"type": "json_object"}},
        "structured_outputs")]


@pytest.mark.parametrize("extra,param", BAD)
def test_bad_grammar_is_400_naming_the_field(server, extra, param):
    status, body = http("POST", server.url + "/v1/chat/completions",
                        {"messages": MESSAGES, "max_tokens": 5, **extra})
    assert status == 400 and body["error"]["param"] == param, body


def test_bad_schema_does_not_disturb_other_streams(server):
    """A stream with a schema runs while invalid schemas are refused beside it."""
    out = {}

    def stream():
        parts = []
        with urllib_stream(server.url, {"messages": MESSAGES, "max_tokens": 200, "temperature": 0, "stream": True,
                                        "response_format": {"type": "json_object"}}) as events:
            for ev in events:
                parts.append(ev)
        out["events"] = parts

    t = threading.Thread(target=stream)
    t.start()
    for _ in range(5):
        status, body = http("POST", server.url + "/v1/chat/completions",
                            {"messages": MESSAGES, "max_tokens": 5, "response_format": {
                                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 17}}}})
        assert status == 400 and body["error"]["param"] == "response_format"
    t.join(120)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in out["events"] if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in out["events"] if c["choices"]][-1]
    assert finish == "length" or isinstance(json.loads(text), dict)
    assert http("GET", server.url + "/health")[0] == 200


def test_mask_time_is_a_metric(server):
    status, body = http("POST", server.url + "/v1/completions",
                        {"prompt": "x", "max_tokens": 3, "structured_outputs": {"choice": ["abc", "abd"]}})
    assert status == 200
    metrics = http("GET", server.url + "/metrics")[1]
    (value,) = re.findall(r"^pyserve:structured_output_mask_seconds_total (\S+)$", metrics, re.M)
    assert float(value) > 0


class urllib_stream:
    """Server-sent events of one POST, as parsed JSON objects."""

    def __init__(self, url: str, body: dict):
        import urllib.request

        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        self.resp = urllib.request.urlopen(req, timeout=120)

    def __enter__(self):
        def events():
            for line in self.resp:
                line = line.strip()
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    yield json.loads(line[6:])
        return events()

    def __exit__(self, *exc):
        self.resp.close()
