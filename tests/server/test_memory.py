"""The server's memory does not grow with the number of requests it has served (issue 13).

A short soak through the official SDK: mixed completions and chats, streamed and not, prompts of 3 to
400 words (so that almost every step has a batch size not seen before), streams hung up after three
chunks, requests refused with a 400. The resident memory is read after a first round that warms
everything up, then after two more rounds of the same size; a leak of 0.5 MB per request would add
ROUND MB per round, far past the margin. bench/soak.py is the long version.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.server.conftest import Server, http

ROUND = 160  # requests per round
MARGIN_MB = 64  # over two rounds, 320 requests: 0.2 MB per request; noise seen: +-30 MB
GAUGES = ("pyserve:num_requests_running", "pyserve:num_requests_waiting", "pyserve:kv_cache_usage_perc")
WORDS = ("river mountain city garden engine library teacher student market harbor forest window village "
         "computer bridge island kitchen builds carries watches remembers follows discovers quiet bright "
         "small ancient busy golden hidden slowly quickly near behind across under").split()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def one_request(client, rng: random.Random, model: str) -> None:
    import openai

    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 400)))
    kw = dict(model=model, max_tokens=rng.randint(1, 6), temperature=rng.choice((0.0, 0.7, 1.2)),
              seed=rng.randrange(1 << 30))
    kind = rng.random()
    if kind < 0.08:  # refused: more tokens than the context holds
        with pytest.raises(openai.BadRequestError):
            client.completions.create(prompt=text, **{**kw, "max_tokens": 10 ** 6})
        return
    chat = rng.random() < 0.5
    stream = rng.random() < 0.6
    create = client.chat.completions.create if chat else client.completions.create
    body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    if not stream:
        out = create(**body, **kw)
        assert out.usage.completion_tokens >= 1
        return
    chunks = create(**body, **kw, stream=True)
    hang_up = rng.random() < 0.2
    for i, _ in enumerate(chunks):
        if hang_up and i == 2:
            break
    chunks.close()


def run_round(client, model: str, seed: int) -> None:
    rng = random.Random(seed)
    seeds = [rng.randrange(1 << 30) for _ in range(ROUND)]
    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(one_request, client, random.Random(s), model) for s in seeds]:
            f.result()


@pytest.fixture(scope="module")
def soak_server():
    s = Server("--max-num-seqs", "16").wait_ready()
    yield s
    s.stop()


def test_resident_memory_does_not_grow_with_requests(soak_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{soak_server.url}/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    pid = soak_server.proc.pid
    run_round(client, model, seed=1)  # warm-up: allocator pools, tokenizer caches, prefix cache fill up
    readings = [rss_mb(pid)]
    for seed in (2, 3):
        run_round(client, model, seed)
        readings.append(rss_mb(pid))
    grew = readings[-1] - readings[0]
    print(f"RSS after rounds of {ROUND} requests: {readings} MB")
    assert grew < MARGIN_MB, (f"RSS after each round of {ROUND} requests: {readings} MB; it grew {grew:.1f} MB "
                              f"over {2 * ROUND} requests ({grew / (2 * ROUND):.3f} MB per request)")
    deadline = time.monotonic() + 30  # hung-up streams are aborted as the server notices them
    while True:
        status, text = http("GET", soak_server.url + "/metrics")
        gauges = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith(GAUGES)}
        if not any(gauges.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200 and len(gauges) == len(GAUGES) and not any(gauges.values()), gauges


def _settled_rss_mb(pid: int, timeout: float = 60) -> float:
    """RSS once the KV-cache prefault thread has backed the cache (two readings a second apart agree)."""
    deadline, last = time.monotonic() + timeout, rss_mb(pid)
    while time.monotonic() < deadline:
        time.sleep(1)
        now = rss_mb(pid)
        if abs(now - last) < 2:
            return now
        last = now
    return last


def test_resident_memory_is_the_file_plus_the_cache():
    """Issue 16's budget: after startup, serving the default model with a 1 GiB KV cache holds at most a
    bare `import torch`, the GGUF file's size, the cache and 200 MB (weights stay in their blocks)."""
    import os
    import subprocess
    import sys

    from pyserve.loader import default_gguf_path

    status = subprocess.run([sys.executable, "-c", "import torch; print(open('/proc/self/status').read())"],
                            capture_output=True, text=True, check=True).stdout
    bare = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
    file_mb = os.path.getsize(default_gguf_path()) / 2**20
    server = Server("--kv-cache-memory", "1").wait_ready()
    try:
        rss = _settled_rss_mb(server.proc.pid)
    finally:
        server.stop()
    budget = bare + file_mb + 1024 + 200
    print(f"RSS {rss:.0f} MB; budget {budget:.0f} MB = torch {bare:.0f} + file {file_mb:.0f} + cache 1024 + 200")
    assert rss <= budget, f"RSS {rss:.0f} MB over the budget of {budget:.0f} MB (torch {bare:.0f}, file {file_mb:.0f})"
