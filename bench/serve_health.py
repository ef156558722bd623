"""/health latency while N streams generate, plus the streams' throughput.

Starts `python -m pyserve` (default model unless --model) on a free port, or
uses a running server with --url; waits for /health; measures /health latency
idle, then again while --streams concurrent streaming completions run
(--max-tokens each, EOS ignored). Prints percentiles and a JSON line.

    python bench/serve_health.py [--streams 32] [--max-tokens 128] [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _get_ms(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        r.read()
    return (time.perf_counter() - t) * 1000


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between /health probes")
    args = ap.parse_args()

    proc = None
    url = args.url
    if url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "pyserve", "--port", str(port), "--kv-cache-memory", "1",
               "--max-model-len", "2048"] + (["--model", args.model] if args.model else [])
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _get_ms(url + "/health")
                break
            except OSError:
                if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                    sys.exit("the server did not become ready")
                time.sleep(0.2)

        idle = []
        for _ in range(50):
            idle.append(_get_ms(url + "/health"))
            time.sleep(args.interval)

        tokens = [0] * args.streams

        def stream(i: int) -> None:
            body = {"prompt": f"Write a long story about the number {i}.", "max_tokens": args.max_tokens,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                events = [e[6:] for e in r.read().decode().split("\n\n") if e.startswith("data: ")]
            tokens[i] = json.loads(events[-2])["usage"]["completion_tokens"]

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(args.streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        loaded = []
        while any(t.is_alive() for t in threads):
            loaded.append(_get_ms(url + "/health"))
            time.sleep(args.interval)
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)

    out = {"streams": args.streams, "max_tokens": args.max_tokens, "output_tokens": sum(tokens),
           "tokens_per_s": sum(tokens) / elapsed,
           "health_idle_ms": {"p50": statistics.median(idle), "p99": _pct(idle, 99)},
           "health_loaded_ms": {"p50": statistics.median(loaded), "p99": _pct(loaded, 99), "max": max(loaded),
                                "probes": len(loaded)}}
    print(f"/health idle: p50 {out['health_idle_ms']['p50']:.2f} ms, p99 {out['health_idle_ms']['p99']:.2f} ms")
    print(f"/health with {args.streams} streams: p50 {out['health_loaded_ms']['p50']:.2f} ms, "
          f"p99 {out['health_loaded_ms']['p99']:.2f} ms, max {out['health_loaded_ms']['max']:.2f} ms "
          f"({len(loaded)} probes)")
    print(f"streams: {sum(tokens)} tokens in {elapsed:.1f} s = {out['tokens_per_s']:.1f} tok/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
