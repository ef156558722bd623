"""Bad requests: OpenAI's error body, the right status, the parameter named; never a 500."""

from __future__ import annotations

import json
import socket

import pytest

from .conftest import SERVER_ARGS, Server, http

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _check(status, body, want_status, param=None, code=None):
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def test_wrong_model_404(server):
    _check(*http("POST", server.url + "/v1/chat/completions", {**CHAT, "model": "gpt-9"}), 404, "model",
           "model_not_found")


def test_wrong_model_sdk(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT["messages"])


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("n", 0), ("max_tokens", 0),
                                         ("presence_penalty", 3), ("top_k", -5), ("stop", 7),
                                         ("logit_bias", {"999999": 1}), ("stop", ["x" * 1025])])
def test_bad_values_400(server, field, value):
    _check(*http("POST", server.url + "/v1/chat/completions", {**CHAT, field: value}), 400, field)


def test_bad_completion_prompt(server):
    _check(*http("POST", server.url + "/v1/completions", {"prompt": 5}), 400, "prompt")
    _check(*http("POST", server.url + "/v1/completions", {"prompt": ""}), 400, "prompt")


def test_malformed_json(server):
    _check(*http("POST", server.url + "/v1/chat/completions", raw=b'{"messages": ['), 400)
    _check(*http("POST", server.url + "/v1/completions", raw=b"[1, 2]"), 400)


def test_context_length_exceeded(server):
    _check(*http("POST", server.url + "/v1/completions", {"prompt": "hello " * 1500, "max_tokens": 1000}), 400,
           code="context_length_exceeded")
    _check(*http("POST", server.url + "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "hi " * 3000}]}), 400, code="context_length_exceeded")


def test_unsupported_fields(server):
    functions = [{"name": "f", "parameters": {}}]  # the API's deprecated form of tools
    status, body = http("POST", server.url + "/v1/chat/completions", {**CHAT, "functions": functions})
    _check(status, body, 400, "functions")
    assert "not supported" in body["error"]["message"]
    _check(*http("POST", server.url + "/v1/chat/completions",
                 {**CHAT, "response_format": {"type": "xml"}}), 400, "response_format")


def test_auto_tool_choice_needs_the_server_flags(server):
    """As vLLM: tools with tool_choice "auto" (the default when tools are given) need
    --enable-auto-tool-choice and --tool-call-parser; this server has neither."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    status, body = http("POST", server.url + "/v1/chat/completions", {**CHAT, "tools": tools})
    _check(status, body, 400, "tool_choice")
    assert "--tool-call-parser" in body["error"]["message"]


def test_bad_messages(server):
    _check(*http("POST", server.url + "/v1/chat/completions", {"messages": []}), 400, "messages")
    _check(*http("POST", server.url + "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}),
           400, "messages")


def test_unknown_route_and_method(server):
    _check(*http("GET", server.url + "/v1/nothing"), 404)
    status, _ = http("GET", server.url + "/v1/completions")
    assert status == 405


def test_detokenize_bad_ids(server):
    _check(*http("POST", server.url + "/detokenize", {"tokens": [-1]}), 400, "tokens")


@pytest.fixture(scope="module")
def auth_server():
    s = Server("--api-key", "sekret").wait_ready()
    yield s
    s.stop()


def test_api_key(auth_server):
    url = auth_server.url
    _check(*http("GET", url + "/v1/models"), 401)
    _check(*http("POST", url + "/v1/completions", {"prompt": "a", "max_tokens": 1},
                 headers={"Authorization": "Bearer wrong"}), 401)
    status, body = http("GET", url + "/v1/models", headers={"Authorization": "Bearer sekret"})
    assert status == 200 and body["data"]
    status, body = http("POST", url + "/v1/completions", {"prompt": "a", "max_tokens": 1},
                        headers={"Authorization": "Bearer sekret"})
    assert status == 200 and body["choices"]
    assert http("GET", url + "/health")[0] == 200
    assert http("GET", url + "/metrics")[0] == 200


CHAT_CASES = [
    {"messages": [{"role": "user", "content": {"a": 1}}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": "hi"},
    {"messages": [{"role": "user"}], "max_tokens": "5"},
    {**CHAT, "stop": [1, 2]},
    {**CHAT, "n": "2"},
    {**CHAT, "logit_bias": [1, 2]},
    {**CHAT, "seed": 1.5},
    {**CHAT, "temperature": "hot"},
    {**CHAT, "model": 5},
    {**CHAT, "stream": "yes"},
    {**CHAT, "top_logprobs": 50, "logprobs": True},
    {**CHAT, "top_logprobs": 2},
    {**CHAT, "response_format": "x"},
    {**CHAT, "stream_options": {"include_usage": True}},
    {**CHAT, "tool_choice": "auto"},
    {**CHAT, "max_completion_tokens": -3},
    {**CHAT, "min_tokens": 5, "max_tokens": 2},
    {**CHAT, "stop_token_ids": [10 ** 9]},
    {**CHAT, "stream": True, "stream_options": {"include_usage": "yes"}},
    {**CHAT, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": 1}},
]
COMPLETION_CASES = [
    {"prompt": [[]]}, {"prompt": [1, "a"]}, {"prompt": []}, {"prompt": [10 ** 9]}, {"prompt": "x", "logprobs": 50},
    {"prompt": "x", "logprobs": True}, {"prompt": "x", "echo": 1}, {"prompt": "x", "suffix": "y"},
    {"prompt": "x", "best_of": 3}, {"prompt": ["ok", ""]},
]


@pytest.mark.parametrize("body", CHAT_CASES)
def test_garbage_chat_is_400(server, body):
    _check(*http("POST", server.url + "/v1/chat/completions", body), 400)


@pytest.mark.parametrize("body", COMPLETION_CASES)
def test_garbage_completion_is_400(server, body):
    _check(*http("POST", server.url + "/v1/completions", body), 400)


@pytest.mark.parametrize("path,body", [("/tokenize", {"prompt": 5}), ("/tokenize", {"prompt": "x", "add_special_tokens": 1}),
                                       ("/tokenize", {"messages": 3}), ("/detokenize", {"tokens": "abc"}),
                                       ("/tokenize", {"prompt": "x", "model": "other"})])
def test_garbage_tokenize_is_4xx(server, path, body):
    status, resp = http("POST", server.url + path, body)
    assert status in (400, 404) and resp["error"]["message"]


# ---- limits and transport-level garbage (issue 6) ----

MAX_MODEL_LEN = int(SERVER_ARGS[SERVER_ARGS.index("--max-model-len") + 1])


def test_prompt_plus_max_tokens_at_the_limit(server):
    """Token-id prompts so the lengths are exact: at --max-model-len is 200, one over is 400."""
    at = {"prompt": [5] * (MAX_MODEL_LEN - 8), "max_tokens": 8}
    status, body = http("POST", server.url + "/v1/completions", at)
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 8
    status, body = http("POST", server.url + "/v1/completions", {**at, "prompt": [5] * (MAX_MODEL_LEN - 7)})
    _check(status, body, 400, "prompt", "context_length_exceeded")
    assert str(MAX_MODEL_LEN) in body["error"]["message"] and str(MAX_MODEL_LEN + 1) in body["error"]["message"]


def test_ten_megabyte_body(server):
    raw = json.dumps({"prompt": [1] * (10 * 2 ** 20 // 3 + 1), "max_tokens": 1}).encode()
    assert len(raw) >= 10 * 2 ** 20
    status, body = http("POST", server.url + "/v1/completions", raw=raw)
    assert status in (400, 413), body
    _check(status, body, status)
    status, body = http("POST", server.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and body["choices"][0]["text"] is not None


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type(server, ctype):
    raw = json.dumps(CHAT).encode()
    status, body = http("POST", server.url + "/v1/chat/completions", raw=raw, headers={"Content-Type": ctype})
    assert status in (400, 415), body
    _check(status, body, status)
    status, _ = http("POST", server.url + "/v1/chat/completions", raw=raw,
                     headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


def test_ten_megabyte_string_prompt_refused_untokenized(server):
    """Tokenizing 10 MB would hold the event loop for seconds; its length alone rules it out."""
    big = "lorem ipsum dolor sit amet " * (10 * 2 ** 20 // 27)
    for path, body in (("/v1/completions", {"prompt": big, "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}),
                       ("/tokenize", {"prompt": big})):
        status, resp = http("POST", server.url + path, body)
        _check(status, resp, 400, None, "context_length_exceeded")
        assert "characters" in resp["error"]["message"], resp
    status, body = http("POST", server.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200


def test_body_over_the_size_limit_413(server):
    """Refused from its Content-Length alone, before the body is read (so send none)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (17 * 2 ** 20) + b'{"prompt": "aaaa')
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    _check(413, json.loads(payload), 413)
    assert http("GET", server.url + "/health")[0] == 200


# Every field each endpoint reads, with a value of the wrong type (a number where a string is due and
# so on): 400 naming that field.
COMMON_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream", "stop", "seed",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos",
                 "min_tokens", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output",
                 "stream_options", "user", "logprobs"]
WRONG = [{"x": 1}, [None], 1.5]


@pytest.mark.parametrize("field", COMMON_FIELDS + ["echo", "prompt"])
def test_wrong_type_completions(server, field):
    for wrong in WRONG:
        if field in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty") and wrong == 1.5:
            wrong = "high"
        body = {"prompt": "hi", "max_tokens": 2, field: wrong}
        _check(*http("POST", server.url + "/v1/completions", body), 400, field)


@pytest.mark.parametrize("field", COMMON_FIELDS + ["messages", "max_completion_tokens", "top_logprobs",
                                                   "add_generation_prompt", "echo", "response_format"])
def test_wrong_type_chat(server, field):
    for wrong in WRONG:
        if field in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty") and wrong == 1.5:
            wrong = "high"
        body = {**CHAT, "logprobs": True, field: wrong} if field == "top_logprobs" else {**CHAT, field: wrong}
        _check(*http("POST", server.url + "/v1/chat/completions", body), 400, field)


# ---- integer ranges (issue 19: a seed past int64 killed the engine until a restart) ----

I64 = 2 ** 63
OUT_OF_RANGE = [  # (endpoint, field, value); each is a 400 naming the field, and the engine lives on
    ("completions", "seed", -I64 - 1), ("completions", "seed", I64), ("chat", "seed", -I64 - 1),
    ("completions", "n", 0), ("completions", "n", 129), ("chat", "n", I64),
    ("completions", "max_tokens", I64), ("chat", "max_completion_tokens", I64), ("chat", "max_tokens", I64),
    ("completions", "min_tokens", I64), ("completions", "top_k", -2), ("chat", "top_k", I64),
    ("completions", "logprobs", 21), ("completions", "logprobs", -1), ("chat", "top_logprobs", -1),
    ("chat", "top_logprobs", I64), ("completions", "stop_token_ids", [I64]), ("chat", "stop_token_ids", [-1]),
    ("completions", "logit_bias", {str(I64): 1}), ("completions", "prompt", [I64]),
    ("completions", "prompt", [[1], [-I64 - 1]]),
]


@pytest.mark.parametrize("endpoint,field,value", OUT_OF_RANGE)
def test_integer_out_of_range_is_400_naming_it(server, endpoint, field, value):
    if endpoint == "chat":
        body = {**CHAT, field: value, **({"logprobs": True} if field == "top_logprobs" else {})}
    else:
        body = {"prompt": "hi", "max_tokens": 2, field: value}
    _check(*http("POST", f"{server.url}/v1/{endpoint.replace('chat', 'chat/completions')}", body), 400, field)
    assert http("GET", server.url + "/health")[0] == 200


def test_integer_edges_are_served(server):
    for extra in ({"seed": -I64}, {"seed": I64 - 1}, {"top_k": I64 - 1}, {"n": 2, "seed": I64 - 1}):
        status, body = http("POST", server.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2, **extra})
        assert status == 200, (extra, body)
        assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert http("GET", server.url + "/health")[0] == 200


def test_health_stays_fast_while_big_prompts_are_tokenized(server):
    """Prompts short enough in characters to need tokenizing, too long in tokens to serve: tokenized on
    the event loop, 20 of them held /health for seconds (issue 19); off it, /health answers at once."""
    import threading
    import time

    big = "the quick brown fox jumps over the lazy dog " * 4500  # 198 kB, ~45k tokens
    assert len(big) < MAX_MODEL_LEN * 100  # under the untokenized bound (longest token >= 100 bytes)
    answers = []
    senders = [threading.Thread(target=lambda: answers.append(
        http("POST", server.url + "/v1/completions", {"prompt": big, "max_tokens": 1})[1]))
        for _ in range(20)]
    for t in senders:
        t.start()
    latencies = []
    while any(t.is_alive() for t in senders):
        t0 = time.perf_counter()
        assert http("GET", server.url + "/health")[0] == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.02)
    for t in senders:
        t.join()
    assert len(answers) == 20 and all(a["error"]["code"] == "context_length_exceeded" for a in answers)
    assert "tokens" in answers[0]["error"]["message"]  # refused after tokenizing, not by its length
    assert len(latencies) >= 5 and max(latencies) < 0.5, sorted(latencies)[-5:]
