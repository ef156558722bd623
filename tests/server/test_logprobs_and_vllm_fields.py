"""Issue 19's API points against the real server: n > 1 streams one choice per chunk; echo with
logprobs includes the prompt's tokens (the first with no logprob); logprobs=0 gives the sampled
token; vLLM's prompt_logprobs, return_token_ids and truncate_prompt_tokens; its other extra fields
are refused by name."""

from __future__ import annotations

import json
import urllib.request

import pytest

from .conftest import SERVER_ARGS, http

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
MAX_MODEL_LEN = int(SERVER_ARGS[SERVER_ARGS.index("--max-model-len") + 1])


def sse(server, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(server.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def tokenize(server, text: str) -> list[int]:
    return http("POST", server.url + "/tokenize", {"prompt": text})[1]["tokens"]


# ---- n > 1 streaming ----

def test_completion_stream_sends_one_choice_per_chunk(client):
    kw = dict(model=MODEL, prompt=["Red, green,", "One, two,"], max_tokens=4, n=2, temperature=0.8, seed=11)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert all(len(c.choices) == 1 for c in chunks)
    streamed: dict[int, str] = {}
    for c in chunks:
        streamed[c.choices[0].index] = streamed.get(c.choices[0].index, "") + c.choices[0].text
    assert streamed == {c.index: c.text for c in full.choices} and len(streamed) == 4


def test_chat_stream_sends_one_choice_per_chunk(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=4, n=3, temperature=0.8, seed=5)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert all(len(c.choices) == 1 for c in chunks)
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1, 2]
    streamed = {i: "" for i in range(3)}
    for c in chunks:
        streamed[c.choices[0].index] += c.choices[0].delta.content or ""
    assert streamed == {c.index: c.message.content for c in full.choices}


# ---- echo with logprobs, logprobs=0 ----

def test_echo_logprobs_cover_the_prompt(client, server):
    prompt = "The capital of France is"
    n_prompt = len(tokenize(server, prompt))
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 3
    assert "".join(lp.tokens[:n_prompt]) == prompt and r.choices[0].text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(lp.tokens[k] in lp.top_logprobs[k] for k in range(1, len(lp.tokens)))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # The generated part is what the same request without echo gives.
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=1)
    assert lp.token_logprobs[n_prompt:] == plain.choices[0].logprobs.token_logprobs
    # Streamed: the prompt's logprobs come in the first chunk.
    first = next(iter(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                                echo=True, logprobs=1, stream=True)))
    assert first.choices[0].logprobs.token_logprobs[:n_prompt] == lp.token_logprobs[:n_prompt]


def test_logprobs_zero_gives_the_sampled_token(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a", max_tokens=4, temperature=0.9, seed=2,
                                  logprobs=0)
    lp = r.choices[0].logprobs
    assert [list(t) for t in lp.top_logprobs] == [[tok] for tok in lp.tokens]
    assert [t[tok] for t, tok in zip(lp.top_logprobs, lp.tokens)] == lp.token_logprobs
    r = client.completions.create(model=MODEL, prompt="Once upon a", max_tokens=4, temperature=0.9, seed=2,
                                  logprobs=2)
    for tok, top in zip(r.choices[0].logprobs.tokens, r.choices[0].logprobs.top_logprobs):
        assert tok in top and len(top) in (2, 3)  # the top 2, plus the sampled token if not among them


# ---- vLLM's prompt_logprobs ----

def check_prompt_logprobs(entries, prompt_ids, top):
    assert entries[0] is None and len(entries) == len(prompt_ids)
    for pos in range(1, len(prompt_ids)):
        entry = entries[pos]
        actual = entry[str(prompt_ids[pos])]
        assert actual["logprob"] <= 0 and actual["rank"] >= 1 and isinstance(actual["decoded_token"], str)
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:top] == list(range(1, top + 1)) and len(entry) in (top, top + 1)


def test_prompt_logprobs(server):
    prompt = "Paris is the capital of"
    status, body = http("POST", server.url + "/v1/completions",
                        {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2, "return_token_ids": True})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["prompt_token_ids"] == tokenize(server, prompt)
    check_prompt_logprobs(choice["prompt_logprobs"], choice["prompt_token_ids"], 2)
    status, body = http("POST", server.url + "/v1/chat/completions",
                        {"messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0, "return_token_ids": True})
    assert status == 200, body
    check_prompt_logprobs(body["prompt_logprobs"], body["prompt_token_ids"], 0)
    assert len(body["prompt_token_ids"]) == body["usage"]["prompt_tokens"]
    status, body = http("POST", server.url + "/v1/completions",
                        {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 1, "stream": True})
    assert status == 400 and body["error"]["param"] == "prompt_logprobs"


# ---- vLLM's return_token_ids ----

def test_return_token_ids(server):
    body = {"prompt": "Blue and", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    status, full = http("POST", server.url + "/v1/completions", body)
    choice = full["choices"][0]
    assert choice["prompt_token_ids"] == tokenize(server, "Blue and") and len(choice["token_ids"]) == 4
    assert http("POST", server.url + "/detokenize", {"tokens": choice["token_ids"]})[1]["prompt"] == choice["text"]
    chunks = sse(server, "/v1/completions", body)
    assert chunks[0]["choices"][0]["prompt_token_ids"] == choice["prompt_token_ids"]
    assert all("prompt_token_ids" not in c["choices"][0] for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == choice["token_ids"]
    without = http("POST", server.url + "/v1/completions", {**body, "return_token_ids": False})[1]
    assert "token_ids" not in without["choices"][0] and "prompt_token_ids" not in without["choices"][0]

    chat = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    status, full = http("POST", server.url + "/v1/chat/completions", chat)
    assert len(full["prompt_token_ids"]) == full["usage"]["prompt_tokens"]
    assert len(full["choices"][0]["token_ids"]) == 4
    chunks = sse(server, "/v1/chat/completions", chat)
    assert chunks[0]["prompt_token_ids"] == full["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0].get("token_ids", [])] == full["choices"][0]["token_ids"]


# ---- vLLM's truncate_prompt_tokens ----

def test_truncate_prompt_tokens_keeps_the_last_k(server):
    text = "one two three four five six seven eight nine ten eleven twelve"
    ids = tokenize(server, text)
    body = {"prompt": text, "max_tokens": 3, "temperature": 0, "truncate_prompt_tokens": 5, "echo": True,
            "return_token_ids": True}
    status, r = http("POST", server.url + "/v1/completions", body)
    assert status == 200, r
    assert r["usage"]["prompt_tokens"] == 5 and r["choices"][0]["prompt_token_ids"] == ids[-5:]
    same = http("POST", server.url + "/v1/completions", {"prompt": ids[-5:], "max_tokens": 3, "temperature": 0,
                                                         "echo": True})[1]
    assert r["choices"][0]["text"] == same["choices"][0]["text"]  # the echo is the kept part
    status, r = http("POST", server.url + "/v1/chat/completions",
                     {"messages": MESSAGES, "max_tokens": 1, "truncate_prompt_tokens": 3})
    assert status == 200 and r["usage"]["prompt_tokens"] == 3
    status, r = http("POST", server.url + "/v1/completions",
                     {"prompt": text, "max_tokens": 1, "truncate_prompt_tokens": MAX_MODEL_LEN + 1})
    assert status == 400 and r["error"]["param"] == "truncate_prompt_tokens"


# ---- other vLLM fields: refused by name ----

REFUSED = [("completions", "cache_salt", "secret"), ("completions", "use_beam_search", True),
           ("completions", "priority", 1), ("completions", "allowed_token_ids", [1, 2]),
           ("completions", "bad_words", ["red"]), ("completions", "request_id", "mine"),
           ("completions", "return_tokens_as_token_ids", True), ("completions", "add_special_tokens", False),
           ("completions", "logits_processors", ["x.y"]), ("completions", "vllm_xargs", {"a": 1}),
           ("chat", "cache_salt", "secret"), ("chat", "chat_template", "{{ messages }}"),
           ("chat", "continue_final_message", True), ("chat", "structural_tag", {"x": 1}),
           ("chat", "length_penalty", 2.0), ("chat", "spaces_between_special_tokens", False)]


@pytest.mark.parametrize("endpoint,field,value", REFUSED)
def test_unimplemented_vllm_fields_are_400(server, endpoint, field, value):
    path, body = (("/v1/chat/completions", {"messages": MESSAGES}) if endpoint == "chat"
                  else ("/v1/completions", {"prompt": "Hi"}))
    status, r = http("POST", server.url + path, {**body, "max_tokens": 1, field: value})
    assert status == 400 and r["error"]["param"] == field and "not supported" in r["error"]["message"], r


def test_vllm_fields_at_their_defaults_are_accepted(server):
    defaults = {"use_beam_search": False, "priority": 0, "length_penalty": 1, "spaces_between_special_tokens": True,
                "bad_words": [], "return_tokens_as_token_ids": False, "cache_salt": None}
    status, r = http("POST", server.url + "/v1/completions",
                     {"prompt": "Hi", "max_tokens": 1, "add_special_tokens": True, **defaults})
    assert status == 200, r
    status, r = http("POST", server.url + "/v1/chat/completions",
                     {"messages": MESSAGES, "max_tokens": 1, "continue_final_message": False, **defaults})
    assert status == 200, r
