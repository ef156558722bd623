"""Soak test: sustained mixed traffic against a pyserve process, watching its memory.

Starts `pyserve` (or attaches to one with `--base-url` and `--pid`), runs `--concurrency` closed-loop
clients for `--duration` seconds on loopback, and samples the server's resident memory (VmRSS) and its
gauges (`/metrics`: running, waiting, KV-cache usage) every `--interval` seconds. The traffic is seeded
and mixed the way an operator's would be: completions and chats, 60% streamed, prompts of 3 to 400 words,
`max_tokens` 1 to 96, temperatures 0 / 0.7 / 1.2, a fifth of the streams hung up after three events, a
tenth of the bodies malformed (bad JSON, wrong types, unknown model, over-long `max_tokens`).

It fails (exit 1) on any 5xx, any client error (a connection refused or reset, a malformed response, an
`error` event in a stream, a request that did not finish within `--request-timeout`), gauges that are not
back to 0 once the load stops, or RSS growth above `--max-growth-mb` between the end of the first quarter
(warm-up: caches and allocator pools fill) and the end. It prints a timeline and writes JSON (`--json`).

    python bench/soak.py --duration 1800 --json bench/results-soak.json
    python bench/soak.py --duration 600 -- --max-num-seqs 2 --kv-cache-memory 0.05 --max-queued-requests 8

Arguments after `--` go to `pyserve`. Only loopback addresses are ever targeted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from serve import _ADJS, _ADVS, _NOUNS, _PREPS, _VERBS  # noqa: E402  (the same vocabulary as serve.py)

LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|localhost|\[::1\])$")


# ---- traffic -------------------------------------------------------------------------------------------

def words(rng: random.Random, n: int) -> str:
    pool = (_NOUNS, _VERBS, _ADJS, _ADVS, _PREPS)
    return " ".join(rng.choice(rng.choice(pool)) for _ in range(n))


@dataclass
class Planned:
    path: str
    body: bytes
    stream: bool
    hang_up_after: int | None  # events read before the client closes the connection
    malformed: bool


def plan_request(rng: random.Random, model: str) -> Planned:
    chat = rng.random() < 0.5
    stream = rng.random() < 0.6
    text = words(rng, rng.randint(3, 400))
    body: dict = {"model": model, "max_tokens": rng.randint(1, 96), "temperature": rng.choice((0.0, 0.7, 1.2)),
                  "stream": stream}
    if rng.random() < 0.5:
        body["seed"] = rng.randrange(1 << 31)
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = text
        path = "/v1/completions"
    malformed = rng.random() < 0.1
    if malformed:
        kind = rng.randrange(5)
        if kind == 0:
            raw = json.dumps(body).encode()[:-rng.randint(1, 10)]  # truncated JSON
            return Planned(path, raw, False, None, True)
        if kind == 1:
            body["max_tokens"] = "lots"
        elif kind == 2:
            body["model"] = "no-such-model"
        elif kind == 3:
            body["max_tokens"] = 10 ** 7  # over the context length
        else:
            body["temperature"] = -3
        stream = False
        body["stream"] = False
    hang_up = 3 if stream and rng.random() < 0.2 else None
    return Planned(path, json.dumps(body).encode(), stream, hang_up, malformed)


@dataclass
class Tally:
    ok: int = 0
    client_4xx: int = 0
    server_5xx: int = 0
    hang_ups: int = 0
    client_errors: int = 0
    unexpected_4xx: int = 0  # a well-formed request that got a 4xx other than 429
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    completion_tokens: int = 0


async def send(host: str, port: int, p: Planned, timeout: float, t: Tally) -> int | None:
    """Send one request and check its answer; the HTTP status (None when there was none)."""
    head = (f"POST {p.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(p.body)}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        t.client_errors += 1
        t.errors[f"connect: {type(e).__name__}"] += 1
        return None
    try:
        writer.write(head + p.body)
        status = int((await asyncio.wait_for(reader.readline(), timeout)).split()[1])
        if status >= 500:
            t.server_5xx += 1
            t.errors[f"HTTP {status}"] += 1
            return status
        if status != 200:
            t.client_4xx += 1
            if not p.malformed and status != 429:
                t.unexpected_4xx += 1
                t.errors[f"unexpected HTTP {status}"] += 1
            return status
        if p.hang_up_after is not None:
            events = 0
            while events < p.hang_up_after:
                line = await asyncio.wait_for(reader.readline(), timeout)
                if not line:
                    break
                events += line.startswith(b"data:")
            t.hang_ups += 1
            return status
        payload = await asyncio.wait_for(reader.read(), timeout)
        body = payload.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in payload else payload
        if p.stream:
            t.completion_tokens += check_stream(body)
        else:
            start = body.find(b"{")
            doc = json.loads(body[start:body.rfind(b"}") + 1])
            if "choices" not in doc:
                raise ValueError(f"no choices in {body[:200]!r}")
            t.completion_tokens += doc["usage"]["completion_tokens"]
        t.ok += 1
        t.latencies.append(time.perf_counter() - t0)
        return status
    except (OSError, ValueError, IndexError, KeyError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        t.client_errors += 1
        t.errors[f"{type(e).__name__}: {str(e)[:400]}"] += 1
        return None
    finally:
        writer.close()


def check_stream(body: bytes) -> int:
    """The completion tokens a well-formed event stream reports (0 without usage); ValueError otherwise."""
    done, tokens = False, 0
    for line in body.split(b"\n"):
        if not line.startswith(b"data:"):
            continue  # chunk sizes and blank lines of the chunked encoding
        payload = line[5:].strip()
        if done:
            raise ValueError(f"an event after [DONE]: {payload[:200]!r}")
        if payload == b"[DONE]":
            done = True
            continue
        event = json.loads(payload)
        if "error" in event:
            raise ValueError(f"error event: {payload[:300]!r}")
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    if not done:
        raise ValueError(f"stream ended without [DONE]: ...{body[-300:]!r}")
    return tokens


# ---- observation ---------------------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


GAUGES = ("pyserve:num_requests_running", "pyserve:num_requests_waiting", "pyserve:kv_cache_usage_perc")
COUNTERS = ("pyserve:num_preemptions_total",)


def gauges(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in GAUGES or name in COUNTERS:
            out[name] = float(value)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, model: str | None, extra: list[str], log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pyserve", "--port", str(port)] + (["--model", model] if model else []) + extra
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSERVE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soak: pyserve exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"soak: pyserve not ready after 300 s; see {log_path}")


def model_id(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


# ---- the run -------------------------------------------------------------------------------------------

async def soak(url: str, pid: int, duration: float, concurrency: int, interval: float, seed: int,
               request_timeout: float) -> tuple[Tally, list[dict]]:
    host, port = url.split("//")[1].rsplit(":", 1)
    port = int(port)
    model = model_id(url)
    tally = Tally()
    timeline: list[dict] = []
    t_start = time.monotonic()
    stop_at = t_start + duration
    loop = asyncio.get_running_loop()

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < stop_at:
            if await send(host, port, plan_request(rng, model), request_timeout, tally) == 429:
                await asyncio.sleep(rng.uniform(0.25, 1.0))  # back off, as the OpenAI SDK does

    async def sampler() -> None:
        while True:
            g = await loop.run_in_executor(None, gauges, url)
            served = tally.ok + tally.client_4xx + tally.hang_ups
            timeline.append({"t_s": round(time.monotonic() - t_start, 1), "rss_mb": round(rss_mb(pid), 1),
                             "requests": served, "ok": tally.ok, **{k.split(":")[1]: v for k, v in g.items()}})
            row = timeline[-1]
            print(f"soak: {row['t_s']:7.1f} s  rss {row['rss_mb']:7.1f} MB  requests {served:6d}  "
                  f"running {g.get(GAUGES[0], -1):3.0f}  waiting {g.get(GAUGES[1], -1):3.0f}  "
                  f"kv {g.get(GAUGES[2], -1):.2f}", flush=True)
            if time.monotonic() >= stop_at:
                return
            await asyncio.sleep(min(interval, max(0.0, stop_at - time.monotonic())))

    await asyncio.gather(sampler(), *(client(i) for i in range(concurrency)))
    return tally, timeline


def settle(url: str, timeout: float = 60) -> dict[str, float]:
    """The gauges once the server has finished what the hung-up and last requests left running."""
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(url)
        if all(v == 0 for k, v in g.items() if k in GAUGES) or time.monotonic() > deadline:
            return g
        time.sleep(0.5)


def growth(timeline: list[dict], from_fraction: float) -> tuple[float, float, float]:
    """(RSS at the sample closest to from_fraction of the run, RSS at the end, their difference)."""
    end_t = timeline[-1]["t_s"]
    ref = min(timeline, key=lambda r: abs(r["t_s"] - from_fraction * end_t))
    return ref["rss_mb"], timeline[-1]["rss_mb"], timeline[-1]["rss_mb"] - ref["rss_mb"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=480, help="seconds of load (default 480)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--interval", type=float, default=15, help="seconds between samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="model for the pyserve it starts (default: the default model)")
    ap.add_argument("--base-url", default=None, help="attach to a running server on loopback (needs --pid)")
    ap.add_argument("--pid", type=int, default=None, help="the attached server's process id")
    ap.add_argument("--max-growth-mb", type=float, default=64)
    ap.add_argument("--growth-from", type=float, default=0.25, help="fraction of the run the growth is measured from")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args(argv)

    proc = None
    if a.base_url:
        if a.pid is None:
            ap.error("--base-url needs --pid (the server's process id, to read its memory)")
        url = a.base_url.rstrip("/").removesuffix("/v1")
        if not LOOPBACK.match(url.split("//")[-1].rsplit(":", 1)[0]):
            ap.error("--base-url must be a loopback address")
        pid = a.pid
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        extra = extra or ["--kv-cache-memory", "1"]
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pyserve-soak-{port}.log"
        print(f"soak: starting pyserve {' '.join(extra)} (log {log_path})", flush=True)
        proc = start_server(port, a.model, extra, log_path)
        pid = proc.pid
    try:
        t0 = time.monotonic()
        tally, timeline = asyncio.run(soak(url, pid, a.duration, a.concurrency, a.interval, a.seed,
                                           a.request_timeout))
        elapsed = time.monotonic() - t0
        final = settle(url)
        rss_end = rss_mb(pid)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    ref, end, grew = growth(timeline, a.growth_from)
    lat = sorted(tally.latencies)
    result = {
        "duration_s": round(elapsed, 1), "concurrency": a.concurrency, "seed": a.seed, "server_args": extra,
        "ok": tally.ok, "client_4xx": tally.client_4xx, "unexpected_4xx": tally.unexpected_4xx,
        "server_5xx": tally.server_5xx, "hang_ups": tally.hang_ups, "client_errors": tally.client_errors,
        "errors": dict(tally.errors), "completion_tokens": tally.completion_tokens,
        "output_tok_s": round(tally.completion_tokens / elapsed, 1),
        "requests_per_s": round((tally.ok + tally.client_4xx + tally.hang_ups) / elapsed, 2),
        "latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "rss_from_mb": ref, "rss_end_mb": end, "rss_growth_mb": round(grew, 1), "rss_after_settle_mb": rss_end,
        "gauges_after": final, "timeline": timeline,
    }
    failures = []
    if tally.server_5xx:
        failures.append(f"{tally.server_5xx} responses were 5xx")
    if tally.client_errors:
        failures.append(f"{tally.client_errors} client errors: {dict(tally.errors)}")
    if tally.unexpected_4xx:
        failures.append(f"{tally.unexpected_4xx} well-formed requests got a 4xx other than 429")
    if any(v != 0 for k, v in final.items() if k in GAUGES):
        failures.append(f"gauges not back to 0 after the load: {final}")
    if grew > a.max_growth_mb:
        failures.append(f"RSS grew {grew:.1f} MB from {a.growth_from:.0%} of the run to its end "
                        f"(limit {a.max_growth_mb} MB)")
    result["failures"] = failures
    print(f"soak: {tally.ok} ok, {tally.client_4xx} 4xx ({tally.unexpected_4xx} unexpected), "
          f"{tally.server_5xx} 5xx, {tally.hang_ups} hang-ups, {tally.client_errors} client errors; "
          f"{result['output_tok_s']} output tok/s, {result['requests_per_s']} req/s")
    print(f"soak: RSS {ref:.1f} MB at {a.growth_from:.0%} of the run -> {end:.1f} MB at the end "
          f"({grew:+.1f} MB); gauges after: {final}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    for f in failures:
        print(f"soak: FAIL: {f}")
    print("soak: PASS" if not failures else "soak: FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
