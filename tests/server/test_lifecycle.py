"""Client disconnects, SIGTERM drain, a failing startup phase."""

from __future__ import annotations

import http.client as httpclient
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from .conftest import REPO, SERVER_ARGS, Server, free_port, http, server_env


def _metric(server, name: str) -> float:
    _, text = http("GET", server.url + "/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.split()[-1])
    return total


def test_client_disconnect_aborts(server):
    aborts = _metric(server, 'pyserve:request_success_total{finished_reason="abort"}')
    conn = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 1500, "ignore_eos": True,
                                                        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.readline()  # the first chunk is on its way: the request is running
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (_metric(server, 'pyserve:request_success_total{finished_reason="abort"}') > aborts
                and _metric(server, "pyserve:num_requests_running") == 0):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the disconnected request was not aborted")
    assert http("GET", server.url + "/health")[0] == 200


def test_sigterm_drains_then_exits_0():
    s = Server("--shutdown-timeout", "60").wait_ready()
    try:
        result = {}

        def stream():
            conn = httpclient.HTTPConnection("127.0.0.1", s.port, timeout=120)
            # Long enough to outlast the 0.3 s below: with 40 tokens (~0.4 s at c=1) the drained server
            # could exit before the second request, which then saw a refused connection, not a 503.
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 400,
                                                                "ignore_eos": True, "stream": True}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            result["first"] = resp.readline()
            started.set()
            result["rest"] = resp.read().decode()

        started = threading.Event()
        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, body = http("POST", s.url + "/v1/completions", {"prompt": "a", "max_tokens": 1})
        assert status == 503 and body["error"]["message"]
        t.join(120)
        assert result["rest"].rstrip().endswith("data: [DONE]")
        assert '"finish_reason":"length"' in result["rest"]
        assert s.proc.wait(timeout=60) == 0
    finally:
        s.stop()


def test_failing_phase_exits_nonzero_naming_it(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file")
    r = subprocess.run([sys.executable, "-m", "pyserve", "--port", str(free_port()), "--model", str(bad),
                        *SERVER_ARGS], env=server_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "startup failed in phase 'weights'" in r.stderr, r.stderr


def test_queue_full_429():
    s = Server("--max-num-seqs", "1", "--max-queued-requests", "1").wait_ready()
    try:
        conns = []
        for i in range(2):  # one running, one waiting
            c = httpclient.HTTPConnection("127.0.0.1", s.port, timeout=60)
            c.request("POST", "/v1/completions", json.dumps({"prompt": "hello", "max_tokens": 1500,
                                                             "ignore_eos": True, "stream": True}),
                      {"Content-Type": "application/json"})
            conns.append(c)
        # Both get their headers at once, the waiting one too (before its first token).
        assert [c.getresponse().status for c in conns] == [200, 200]
        deadline = time.monotonic() + 30
        while _metric(s, "pyserve:num_requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(s, "pyserve:num_requests_waiting") == 1
        status, body = http("POST", s.url + "/v1/completions", {"prompt": "hello", "max_tokens": 1})
        assert status == 429 and body["error"]["code"] == "queue_full"
        for c in conns:
            c.close()
    finally:
        s.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_zero_timeout_aborts_and_exits_0(sig):
    s = Server("--shutdown-timeout", "0").wait_ready()
    try:
        conn = httpclient.HTTPConnection("127.0.0.1", s.port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 1500, "ignore_eos": True,
                                                            "stream": True}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        s.proc.send_signal(sig)
        rest = resp.read().decode()  # the stream still ends properly, cut short
        assert rest.rstrip().endswith("data: [DONE]"), rest[-500:]
        assert '"finish_reason":"abort"' in rest
        assert rest.count('"finish_reason":"length"') == 0
        assert s.proc.wait(timeout=30) == 0, s.output()[-2000:]
    finally:
        s.stop()


def test_burst_beyond_the_queue_429_and_every_accepted_one_completes():
    s = Server("--max-num-seqs", "2", "--max-queued-requests", "2").wait_ready()
    try:
        results: list[tuple[int, dict]] = []
        go = threading.Event()

        def one():
            go.wait()
            results.append(http("POST", s.url + "/v1/completions",
                                {"prompt": "Count to ten:", "max_tokens": 24, "ignore_eos": True}))

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(120)
        statuses = sorted(st for st, _ in results)
        assert len(results) == 12 and set(statuses) <= {200, 429}, statuses
        ok = [b for st, b in results if st == 200]
        rejected = [b for st, b in results if st == 429]
        assert len(ok) >= 4 and rejected, statuses  # 2 running + 2 queued at least; the rest over the limit
        for b in ok:
            assert b["choices"][0]["finish_reason"] == "length" and b["usage"]["completion_tokens"] == 24, b
        for b in rejected:
            assert b["error"]["code"] == "queue_full" and b["error"]["type"] == "rate_limit_exceeded", b
        deadline = time.monotonic() + 20
        while (_metric(s, "pyserve:num_requests_running") or _metric(s, "pyserve:kv_cache_usage_perc")) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metric(s, "pyserve:num_requests_running") == 0 and _metric(s, "pyserve:kv_cache_usage_perc") == 0
    finally:
        s.stop()
