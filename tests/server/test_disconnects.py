"""A client that goes away in each state of its request (queued, prefilling,
decoding mid-stream) aborts it, and its KV blocks return: seen in /metrics."""

from __future__ import annotations

import http.client as httpclient
import json
import time

import pytest

from .conftest import Server, http

# One sequence at a time, and prefill chunks of 16 tokens, so that a long
# prompt spends many steps prefilling and a second request has to queue.
ARGS = ("--max-num-seqs", "1", "--max-num-batched-tokens", "16", "--no-enable-prefix-caching")
LONG_PROMPT = [(7 * i + 3) % 40000 + 100 for i in range(1800)]


@pytest.fixture(scope="module")
def one_seq_server():
    s = Server(*ARGS).wait_ready()
    yield s
    s.stop()


def metrics(server) -> dict[str, float]:
    _, text = http("GET", server.url + "/metrics")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("pyserve:"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(server, what: str, cond, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(server)
        if cond(m):
            return m
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}: {metrics(server)}")


def idle(m: dict[str, float]) -> bool:
    return (m["pyserve:num_requests_running"] == 0 and m["pyserve:num_requests_waiting"] == 0
            and m["pyserve:kv_cache_usage_perc"] == 0)


def aborts(m: dict[str, float]) -> float:
    return m.get('pyserve:request_success_total{finished_reason="abort"}', 0.0)


def open_stream(server, prompt, max_tokens: int) -> httpclient.HTTPConnection:
    conn = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/completions",
                 json.dumps({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}),
                 {"Content-Type": "application/json"})
    return conn


def hang_up(conn: httpclient.HTTPConnection) -> None:
    conn.sock.close()
    conn.close()


def still_serves(server) -> None:
    status, body = http("POST", server.url + "/v1/completions", {"prompt": "Hello", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3, body


def test_disconnect_mid_stream(one_seq_server):
    s = one_seq_server
    before = wait_for(s, "an idle server", idle)
    conn = open_stream(s, "Once upon a time", 1500)
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):  # a few tokens in: decoding
        assert resp.readline().startswith(b"data: ")
        resp.readline()
    m = metrics(s)
    assert m["pyserve:num_requests_running"] == 1 and m["pyserve:kv_cache_usage_perc"] > 0
    hang_up(conn)
    after = wait_for(s, "the aborted stream's blocks to return", lambda m: idle(m) and aborts(m) > aborts(before))
    assert after["pyserve:generation_tokens_total"] < before["pyserve:generation_tokens_total"] + 1500
    still_serves(s)


def test_disconnect_while_prefilling(one_seq_server):
    s = one_seq_server
    before = wait_for(s, "an idle server", idle)
    conn = open_stream(s, LONG_PROMPT, 16)
    # Prefill has started (prompt tokens are being computed) and no token has come out yet.
    wait_for(s, "the prefill to start",
             lambda m: m["pyserve:prompt_tokens_total"] > before["pyserve:prompt_tokens_total"])
    hang_up(conn)
    after = wait_for(s, "the aborted prefill's blocks to return", lambda m: idle(m) and aborts(m) > aborts(before))
    assert after["pyserve:prompt_tokens_total"] - before["pyserve:prompt_tokens_total"] < len(LONG_PROMPT), \
        "the prompt was prefilled to the end: the abort came too late to test the prefilling state"
    assert after["pyserve:generation_tokens_total"] == before["pyserve:generation_tokens_total"]
    still_serves(s)


def test_disconnect_while_queued(one_seq_server):
    s = one_seq_server
    before = wait_for(s, "an idle server", idle)
    running = open_stream(s, "Once upon a time", 1500)
    resp = running.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    queued = open_stream(s, "A queued request", 1500)
    wait_for(s, "the second request to queue", lambda m: m["pyserve:num_requests_waiting"] == 1)
    hang_up(queued)
    m = wait_for(s, "the queued request to leave the queue",
                 lambda m: m["pyserve:num_requests_waiting"] == 0 and aborts(m) > aborts(before))
    assert m["pyserve:num_requests_running"] == 1  # the first one is untouched
    assert resp.readline() == b"\n" and resp.readline().startswith(b"data: ")
    hang_up(running)
    after = wait_for(s, "every block to return", lambda m: idle(m) and aborts(m) >= aborts(before) + 2)
    assert after["pyserve:prompt_tokens_total"] - before["pyserve:prompt_tokens_total"] < 20, \
        "the queued request was prefilled although it left while waiting"
    still_serves(s)
