"""How long `/health` takes while many requests with huge prompts arrive (issue 19).

    python bench/health_under_load.py --url http://127.0.0.1:8000 --requests 50 --prompt-kb 600

Sends --requests completions at once, each with a prompt of --prompt-kb kilobytes of text, and polls
`/health` every --interval seconds until they have all been answered; prints the /health latencies
(median, p99, max) and how the big requests were answered. The prompts are far longer than the
context, so the server refuses them, but only once it has read (and perhaps tokenized) them.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import statistics
import threading
import time
import urllib.error
import urllib.request


def post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def send_all(url: str, body: bytes, n: int, results) -> None:
    """n requests at once, one thread each; puts the count of each status on results."""
    statuses: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def one() -> None:
        s = post(url + "/v1/completions", body)
        with lock:
            statuses[s] += 1

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(dict(statuses))


def health(url: str) -> tuple[float, int]:
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(url + "/health", timeout=60) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return time.perf_counter() - t, status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--prompt-kb", type=int, default=600)
    ap.add_argument("--interval", type=float, default=0.05)
    args = ap.parse_args()

    words = "the quick brown fox jumps over the lazy dog and keeps running far away "
    prompt = (words * (args.prompt_kb * 1000 // len(words) + 1))[: args.prompt_kb * 1000]
    body = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    baseline = [health(args.url)[0] for _ in range(5)]

    # The big requests go from another process, so that its threads do not slow this one's polls.
    results: multiprocessing.Queue = multiprocessing.Queue()
    sender = multiprocessing.Process(target=send_all, args=(args.url, body, args.requests, results))
    t0 = time.perf_counter()
    sender.start()
    latencies, health_statuses = [], collections.Counter()
    while sender.is_alive() and results.empty():
        dt, s = health(args.url)
        latencies.append(dt)
        health_statuses[s] += 1
        time.sleep(args.interval)
    statuses = results.get()
    sender.join()
    total = time.perf_counter() - t0
    latencies.sort()
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    print(f"idle /health: median {ms(statistics.median(baseline))}")
    print(f"{args.requests} requests of {args.prompt_kb} kB answered in {total:.1f} s: {statuses}")
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        print(f"/health under load: {len(latencies)} polls {dict(health_statuses)}, median "
              f"{ms(statistics.median(latencies))}, p99 {ms(p99)}, max {ms(latencies[-1])}")


if __name__ == "__main__":
    main()
