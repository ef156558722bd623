"""Client disconnects, SIGTERM drain, a failing startup phase."""

from __future__ import annotations

import http.client as httpclient
import json
import signal
import subprocess
import sys
import threading
import time

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
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 40,
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
        assert conns[0].getresponse().status == 200  # (the waiting one's headers come with its first token)
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
