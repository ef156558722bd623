"""The OpenAI-compatible API against the real server (default model)."""

from __future__ import annotations

import json
import urllib.request

from pyserve.sampling_params import SamplingParams

from .conftest import http

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_greedy_matches_offline(client, offline_llm):
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES, temperature=0,
                                       max_tokens=24)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.id.startswith("chatcmpl-") and r.created > 0 and r.system_fingerprint
    offline = offline_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=24))[0]
    assert choice.message.content == offline.outputs[0].text
    assert r.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert r.usage.completion_tokens == len(offline.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_string_prompt(client, offline_llm):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The sky is", max_tokens=8,
                                  temperature=0)
    assert r.object == "text_completion"
    assert len(r.choices) == 1 and r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    offline = offline_llm.generate("The sky is", SamplingParams(temperature=0, max_tokens=8))[0]
    assert r.choices[0].text == offline.outputs[0].text


def test_completion_prompt_list_n_and_logprobs(client):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt=["One, two,", [504, 3937]],
                                  max_tokens=4, n=2, temperature=0.8, seed=1, logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 4
        # the top 2 plus the sampled token (OpenAI: up to logprobs + 1 entries)
        assert all(tok in t and 2 <= len(t) <= 3 for tok, t in zip(c.logprobs.tokens, c.logprobs.top_logprobs))
    assert r.usage.completion_tokens == 16


def test_completion_stop(client):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4,", max_tokens=20,
                                  temperature=0, stop=["7"])
    assert r.choices[0].finish_reason == "stop"
    assert "7" not in r.choices[0].text


def test_chat_stream_equals_non_stream(client):
    kw = dict(model="SmolLM2-135M-Instruct", messages=MESSAGES, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert with_choices[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_raw_sse_done_terminator(server):
    body = {"prompt": "Hello", "max_tokens": 4, "stream": True, "temperature": 0}
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["SmolLM2-135M-Instruct"]


def test_tokenize_detokenize_round_trip(server):
    text = "Hello, world! Ünïcödé 🙂"
    status, tok = http("POST", server.url + "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert status == 200 and tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 2048
    status, detok = http("POST", server.url + "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and detok["prompt"] == text
    status, chat_tok = http("POST", server.url + "/tokenize", {"messages": MESSAGES})
    assert status == 200 and chat_tok["count"] > tok["count"] - 20


def test_metrics_and_version(server, client):
    client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
    status, text = http("GET", server.url + "/metrics")
    assert status == 200
    assert "pyserve:generation_tokens" in text
    assert 'pyserve:startup_phase_seconds{phase="weights"}' in text
    assert "pyserve:request_success_total{finished_reason=" in text
    assert "pyserve:time_to_first_token_seconds_bucket" in text
    gen = [ln for ln in text.splitlines() if ln.startswith("pyserve:generation_tokens_total")]
    assert float(gen[0].split()[-1]) >= 2
    status, v = http("GET", server.url + "/version")
    assert status == 200 and v["version"]
    for phase in ("weights", "tokenizer", "kv_cache", "warmup"):
        assert v["startup"]["phases"][phase] >= 0
    assert v["startup"]["ready_seconds"] > 0


def test_health(server):
    assert http("GET", server.url + "/health")[0] == 200


def test_chat_n_and_logprobs(client):
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES, max_tokens=6, n=3,
                                       temperature=1.0, seed=7, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        content = c.logprobs.content
        assert len(content) >= 1 and all(t.logprob <= 0 for t in content)
        assert all(1 <= len(t.top_logprobs) <= 2 for t in content)
        assert "".join(t.token for t in content) == c.message.content or c.finish_reason == "stop"
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_chat_seed_reproducible(client):
    kw = dict(model="SmolLM2-135M-Instruct", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=123)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_chat_stream_n2(client):
    chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES, max_tokens=5,
                                                 n=2, temperature=0.7, seed=3, stream=True))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason}
    assert set(finished) == {0, 1}


def test_vllm_extras_accepted(client):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Count: 1, 2,", max_tokens=6,
                                  extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
                                              "min_tokens": 6, "ignore_eos": True, "stop_token_ids": [2],
                                              "skip_special_tokens": True})
    assert r.usage.completion_tokens == 6


def test_completion_echo(client):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Echo me", max_tokens=2, echo=True,
                                  temperature=0)
    assert r.choices[0].text.startswith("Echo me")


def test_completion_stream_equals_non_stream_with_stop(client):
    kw = dict(model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4,", max_tokens=24, temperature=0, stop=[" 9"])
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason == "stop"
    assert " 9" not in full.choices[0].text


def test_chat_stop(client):
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=40, temperature=0,
                                       messages=[{"role": "user", "content": "Count from 1 to 20, comma separated."}],
                                       stop=["5"])
    assert r.choices[0].finish_reason == "stop" and "5" not in r.choices[0].message.content


def _sse_chunks(server, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def test_continuous_usage_stats(server):
    """vLLM's stream_options.continuous_usage_stats: the usage so far in every chunk."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in (("/v1/completions", {"prompt": "Hello", "max_tokens": 5, "ignore_eos": True}),
                       ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, "ignore_eos": True})):
        chunks = _sse_chunks(server, path, {**body, "stream": True, "stream_options": options})
        with_text = [c for c in chunks if c["choices"]]
        assert all(c.get("usage") for c in with_text), with_text
        counts = [c["usage"]["completion_tokens"] for c in with_text]
        assert counts == sorted(counts) and counts[-1] == 5, counts
        assert not chunks[-1]["choices"] and chunks[-1]["usage"]["completion_tokens"] == 5
        prompt = {c["usage"]["prompt_tokens"] for c in chunks}
        assert len(prompt) == 1 and prompt.pop() > 0
        # include_usage alone: usage only in the last chunk.
        chunks = _sse_chunks(server, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
        assert all(c.get("usage") is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 5
