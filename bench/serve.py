"""Serving benchmark: a load generator for any OpenAI-compatible server, in the manner of `vllm bench serve`.

Sends a fixed, seeded prompt set as streaming completions (`/v1/completions`, the same raw prompt text for
every server; `--endpoint chat` for `/v1/chat/completions`), closed loop (`--max-concurrency`) and/or open
loop (`--request-rate`, Poisson arrivals; `inf` sends them all at once), and reports successful and failed
requests, duration, request throughput, output and total tokens per second, and TTFT, TPOT, ITL and
end-to-end latency (mean, p50, p90, p99), as a table and as JSON (`--json PATH`).

    python bench/serve.py --base-url http://127.0.0.1:8000 --num-prompts 64 --max-concurrency 8 \\
        --max-tokens 128 --ignore-eos [--request-rate inf] [--warmup 2] [--json out.json]

Definitions (per request): TTFT = time to the first chunk that carries text; ITL = the gaps between
successive text chunks; TPOT = (latency - TTFT) / (output tokens - 1); E2EL = latency. Output tokens are the
server's `usage.completion_tokens` (asked for with `stream_options.include_usage`) when it reports it; else
`max_tokens` when the server says `finish_reason: length`; else the number of text chunks.

A request fails on an HTTP error, an exception, an `error` event in the stream, no text at all, or, with
`--ignore-eos`, fewer output tokens than `--max-tokens`. Failures are counted and reported, never fatal.

Two HTTP clients: `raw` (default; asyncio streams + a minimal HTTP/1.1 and SSE parser, so the client spends
as little CPU as possible on the cores it shares with the server) and `openai` (the AsyncOpenAI SDK, for
reference). The client's own CPU time is measured and reported (`client_cpu_s`); see bench/README.md for
what each client costs against a fake server.

As a module: `run_benchmark(...)` returns the result dict that `print_report` prints; `make_prompts(n, seed)`
gives the prompt set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import ssl as _ssl
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field

# ---------------------------------------------------------------------------------------------------------
# Prompts: deterministic from the seed, the same text for every server.

_NOUNS = ("river mountain city garden engine library teacher student market harbor forest window village "
          "computer bridge island kitchen doctor farmer painter museum station castle desert ocean planet "
          "machine signal letter camera theater orchestra bakery factory hospital tower valley cloud storm "
          "lantern compass journey festival mirror violin notebook bicycle satellite recipe harvest "
          "lighthouse robot river-boat merchant soldier scientist poet captain traveler neighbor "
          "language history question answer problem solution theory experiment memory dream story").split()
_VERBS = ("builds carries watches remembers follows discovers explains changes protects visits paints "
          "measures repairs describes imagines collects answers crosses reaches opens closes finds "
          "teaches learns writes reads studies invents guards fills shapes moves lifts chooses").split()
_ADJS = ("old quiet bright small ancient busy golden hidden gentle strange famous distant careful wooden "
         "silver narrow modern rainy green patient curious heavy simple broken warm cold tall empty "
         "crowded northern southern early late secret lucky humble").split()
_ADVS = "slowly quickly carefully quietly often rarely always suddenly happily patiently again together".split()
_PREPS = "near behind across under beyond beside inside along toward around".split()
_INSTRUCTIONS = (
    "Summarize the text above in a few sentences.",
    "Continue the story above.",
    "Write a short poem inspired by the text above.",
    "List the main characters and places mentioned above.",
    "Explain what happens in the text above to a child.",
    "Rewrite the text above as a news report.",
)


def _sentence(rng: random.Random) -> list[str]:
    words = ["the", rng.choice(_ADJS), rng.choice(_NOUNS), rng.choice(_VERBS), "the", rng.choice(_NOUNS)]
    if rng.random() < 0.5:
        words += [rng.choice(_PREPS), "the", rng.choice(_ADJS), rng.choice(_NOUNS)]
    if rng.random() < 0.4:
        words += ["and", rng.choice(_ADVS), rng.choice(_VERBS), "a", rng.choice(_ADJS), rng.choice(_NOUNS)]
    words[0] = words[0].capitalize()
    words[-1] += "."
    return words


def make_prompts(n: int, seed: int = 0, min_words: int = 50, max_words: int = 300) -> list[str]:
    """`n` prompts, each a paragraph of `min_words`..`max_words` words of simple sentences (uniform length)
    then an instruction; no two share a prefix, so no server gets prefix-cache hits between them."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        target = rng.randint(min_words, max_words)
        words: list[str] = []
        while len(words) < target:
            words += _sentence(rng)
        prompts.append(" ".join(words) + "\n\n" + rng.choice(_INSTRUCTIONS) + "\n")
    return prompts


# ---------------------------------------------------------------------------------------------------------
# Clients.

@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start: float = 0.0  # seconds since the benchmark started
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_source: str = ""  # usage | length | chunks
    chunks: int = 0
    finish_reason: str | None = None
    itl: list[float] = field(default_factory=list)
    text: str = ""


class HTTPError(Exception):
    pass


def split_base_url(base_url: str) -> str:
    """`http://host:port`, `http://host:port/` and `http://host:port/v1` all mean the same server."""
    u = base_url.rstrip("/")
    return u[:-3] if u.endswith("/v1") else u


class RawClient:
    """POST a JSON body, yield (arrival time, SSE data payload) for each event. One connection per request
    (`Connection: close`), HTTP/1.1 with chunked or close-delimited bodies."""

    def __init__(self, base_url: str, api_key: str | None = None):
        u = urllib.parse.urlsplit(split_base_url(base_url))
        self.tls = u.scheme == "https"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.tls else 80)
        self.prefix = u.path.rstrip("/")
        self.api_key = api_key
        self.ssl_ctx = _ssl.create_default_context() if self.tls else None

    async def stream(self, path: str, body: dict):
        data = json.dumps(body).encode()
        head = (f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n")
        if self.api_key:
            head += f"Authorization: Bearer {self.api_key}\r\n"
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl_ctx)
        try:
            writer.write(head.encode() + b"\r\n" + data)
            status_line = await reader.readline()
            parts = status_line.split(None, 2)
            if len(parts) < 2:
                raise HTTPError(f"bad status line {status_line!r}")
            status = int(parts[1])
            headers = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            length = int(headers["content-length"]) if "content-length" in headers else None
            if status != 200:
                raw = await reader.read(4096) if length is None else await reader.readexactly(min(length, 4096))
                raise HTTPError(f"HTTP {status}: {raw[:300].decode('utf-8', 'replace').strip()}")
            buf = b""
            remaining = length
            while True:
                if chunked:
                    size_line = await reader.readline()
                    if not size_line:
                        break
                    size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    piece = await reader.readexactly(size + 2)
                    piece = piece[:-2]
                else:
                    if remaining == 0:
                        break
                    piece = await reader.read(65536 if remaining is None else min(65536, remaining))
                    if not piece:
                        break
                    if remaining is not None:
                        remaining -= len(piece)
                t = time.perf_counter()
                buf += piece
                if b"\r" in buf:
                    buf = buf.replace(b"\r\n", b"\n")
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if line.startswith(b"data:"):
                            payload = line[5:].strip()
                            if payload == b"[DONE]":
                                return
                            yield t, payload
        finally:
            writer.close()

    async def close(self):
        pass


class OpenAIClient:
    """The official AsyncOpenAI SDK (parses every chunk into pydantic objects: more client CPU)."""

    def __init__(self, base_url: str, api_key: str | None = None, max_connections: int = 1024):
        import openai

        kw = {}
        try:
            kw["http_client"] = openai.DefaultAsyncHttpxClient(
                limits=openai._base_client.httpx.Limits(max_connections=max_connections,
                                                        max_keepalive_connections=max_connections))
        except Exception:  # noqa: BLE001 - the SDK's internals moved: take its defaults
            pass
        self.client = openai.AsyncOpenAI(base_url=split_base_url(base_url) + "/v1", api_key=api_key or "EMPTY",
                                         timeout=3600, max_retries=0, **kw)

    async def stream(self, path: str, body: dict):
        body = dict(body)
        known = {"model", "prompt", "messages", "max_tokens", "temperature", "stream", "stream_options", "seed"}
        extra = {k: body.pop(k) for k in list(body) if k not in known}
        if path.endswith("/chat/completions"):
            s = await self.client.chat.completions.create(**body, extra_body=extra or None)
        else:
            s = await self.client.completions.create(**body, extra_body=extra or None)
        async for ch in s:
            yield time.perf_counter(), ch  # a pydantic chunk object; _get reads both it and dicts

    async def close(self):
        await self.client.close()


def _get(obj, key):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


async def _one_request(client, path: str, body: dict, chat: bool, max_tokens: int, ignore_eos: bool,
                       t_bench: float, keep_text: bool) -> RequestResult:
    r = RequestResult()
    t0 = time.perf_counter()
    r.start = t0 - t_bench
    last = None
    usage_tokens = None
    parts: list[str] = []
    try:
        async with contextlib.aclosing(client.stream(path, body)) as events:
            async for t, payload in events:
                ev = json.loads(payload) if isinstance(payload, (bytes, str)) else payload
                err = _get(ev, "error")
                if err:
                    raise HTTPError(f"error event: {json.dumps(err)[:300] if isinstance(err, dict) else err}")
                usage = _get(ev, "usage")
                if usage:
                    ct = _get(usage, "completion_tokens")
                    usage_tokens = ct if ct is not None else usage_tokens
                    r.prompt_tokens = _get(usage, "prompt_tokens")
                for c in _get(ev, "choices") or ():
                    text = _get(_get(c, "delta") or {}, "content") if chat else _get(c, "text")
                    if text:
                        if last is None:
                            r.ttft = t - t0
                        else:
                            r.itl.append(t - last)
                        last = t
                        r.chunks += 1
                        if keep_text:
                            parts.append(text)
                    if _get(c, "finish_reason"):
                        r.finish_reason = _get(c, "finish_reason")
        r.latency = time.perf_counter() - t0
        if usage_tokens is not None:
            r.output_tokens, r.token_source = usage_tokens, "usage"
        elif r.finish_reason == "length":
            r.output_tokens, r.token_source = max_tokens, "length"
        else:
            r.output_tokens, r.token_source = r.chunks, "chunks"
        r.text = "".join(parts)
        if r.chunks == 0:
            r.error = f"no text in the stream (finish_reason {r.finish_reason!r})"
        elif ignore_eos and r.output_tokens < max_tokens:
            r.error = (f"short: {r.output_tokens} of {max_tokens} tokens with ignore_eos "
                       f"(finish_reason {r.finish_reason!r}, counted by {r.token_source})")
        else:
            r.ok = True
    except Exception as e:  # noqa: BLE001 - every failure is counted, none is fatal
        r.latency = time.perf_counter() - t0
        r.error = f"{type(e).__name__}: {e}"[:500]
    return r


# ---------------------------------------------------------------------------------------------------------
# Statistics and the run.

def percentile(xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(xs_s: list[float]) -> dict:
    """Seconds in, milliseconds out: mean, median (p50), p90, p99, max, n."""
    xs = [x * 1000 for x in xs_s]
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None, "n": 0}
    return {"mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90),
            "p99": percentile(xs, 99), "max": max(xs), "n": len(xs)}


def get_model_id(base_url: str, api_key: str | None = None, timeout: float = 30) -> str:
    req = urllib.request.Request(split_base_url(base_url) + "/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())["data"][0]["id"]


def _body(model: str, prompt: str, chat: bool, max_tokens: int, temperature: float, ignore_eos: bool,
          include_usage: bool, extra_body: dict | None) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    if extra_body:
        body.update(extra_body)
    return body


async def benchmark(base_url: str, prompts: list[str], *, model: str | None = None, endpoint: str = "completions",
                    max_tokens: int = 128, ignore_eos: bool = False, temperature: float = 0.0,
                    max_concurrency: int | None = None, request_rate: float = math.inf, seed: int = 0,
                    warmup_prompts: list[str] | None = None, client: str = "raw", api_key: str | None = None,
                    extra_body: dict | None = None, include_usage: bool = True, keep_text: bool = False,
                    detail: bool = False, label: str = "") -> dict:
    """Run `prompts` against the server at `base_url`; return the result dict (see `print_report`)."""
    chat = endpoint == "chat"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if model is None:
        model = await asyncio.to_thread(get_model_id, base_url, api_key)
    cl = RawClient(base_url, api_key) if client == "raw" else OpenAIClient(base_url, api_key)

    def body(p: str) -> dict:
        return _body(model, p, chat, max_tokens, temperature, ignore_eos, include_usage, extra_body)

    try:
        if warmup_prompts:
            wsem = asyncio.Semaphore(max_concurrency or len(warmup_prompts))

            async def warm(p):
                async with wsem:
                    return await _one_request(cl, path, body(p), chat, max_tokens, ignore_eos, time.perf_counter(),
                                              False)

            warm_results = await asyncio.gather(*(warm(p) for p in warmup_prompts))
            warm_failed = [w.error for w in warm_results if not w.ok]
        else:
            warm_failed = []

        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        rng = random.Random(seed)
        t_bench = time.perf_counter()
        cpu0 = time.process_time()

        async def one(p: str) -> RequestResult:
            if sem is None:
                return await _one_request(cl, path, body(p), chat, max_tokens, ignore_eos, t_bench, keep_text)
            async with sem:
                return await _one_request(cl, path, body(p), chat, max_tokens, ignore_eos, t_bench, keep_text)

        tasks = []
        for i, p in enumerate(prompts):
            if i and math.isfinite(request_rate) and request_rate > 0:
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(one(p)))
        results: list[RequestResult] = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t_bench
        client_cpu = time.process_time() - cpu0
    finally:
        await cl.close()

    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    in_known = all(r.prompt_tokens is not None for r in good) and bool(good)
    in_tokens = sum(r.prompt_tokens for r in good) if in_known else None
    errors: dict[str, int] = {}  # message (first 160 chars) -> count; at most 10 kinds, then "other"
    for r in results:
        if not r.ok:
            key = r.error[:160] if r.error[:160] in errors or len(errors) < 10 else "other"
            errors[key] = errors.get(key, 0) + 1
    sources: dict[str, int] = {}
    for r in good:
        sources[r.token_source] = sources.get(r.token_source, 0) + 1
    res = {
        "label": label,
        "base_url": base_url, "model": model, "endpoint": endpoint, "client": client,
        "num_prompts": len(prompts), "max_tokens": max_tokens, "ignore_eos": ignore_eos,
        "temperature": temperature, "max_concurrency": max_concurrency,
        "request_rate": request_rate if math.isfinite(request_rate) else "inf", "seed": seed,
        "warmup": len(warmup_prompts or ()), "warmup_failed": len(warm_failed),
        "completed": len(good), "failed": len(results) - len(good), "errors": errors,
        "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "output_token_source": sources,
        "request_throughput": len(good) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration if in_tokens is not None else None,
        "ttft_ms": summarize([r.ttft for r in good]),
        "tpot_ms": summarize([(r.latency - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]),
        "itl_ms": summarize([x for r in good for x in r.itl]),
        "e2el_ms": summarize([r.latency for r in good]),
        "client_cpu_s": client_cpu,
        "client_cpu_pct": 100 * client_cpu / duration,
        "requests": [{k: v for k, v in asdict(r).items() if detail or k not in ("itl", "text")} for r in results],
    }
    if not detail:
        res["requests"] = [{k: v for k, v in q.items() if k in ("ok", "error", "start", "ttft", "latency",
                                                               "output_tokens", "prompt_tokens", "finish_reason")}
                           for q in res["requests"]]
    return res


def run_benchmark(*args, **kwargs) -> dict:
    """`benchmark` in a fresh event loop (uvloop when installed)."""
    try:
        import uvloop

        return uvloop.run(benchmark(*args, **kwargs))
    except ImportError:
        return asyncio.run(benchmark(*args, **kwargs))


def print_report(res: dict, file=sys.stdout) -> None:
    w = 50

    def line(name, value, fmt="{:.2f}"):
        v = "-" if value is None else (fmt.format(value) if isinstance(value, float) else str(value))
        print(f"{name + ':':<40}{v:>10}", file=file)

    title = " Serving Benchmark Result " + (f"({res['label']}) " if res.get("label") else "")
    print(title.center(w, "="), file=file)
    line("Successful requests", res["completed"])
    line("Failed requests", res["failed"])
    line("Maximum request concurrency", res["max_concurrency"])
    line("Request rate (req/s)", res["request_rate"] if res["request_rate"] == "inf" else float(res["request_rate"]))
    line("Benchmark duration (s)", res["duration_s"])
    line("Total input tokens", res["total_input_tokens"])
    line("Total generated tokens", res["total_output_tokens"])
    line("Request throughput (req/s)", res["request_throughput"])
    line("Output token throughput (tok/s)", res["output_throughput"])
    line("Total token throughput (tok/s)", res["total_token_throughput"])
    line("Client CPU (s, % of one core)", f"{res['client_cpu_s']:.2f} {res['client_cpu_pct']:.0f}%")
    for key, name in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                      ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        s = res[key]
        print(f" {name} ".center(w, "-"), file=file)
        short = key.split("_")[0].upper()
        for stat in ("mean", "p50", "p90", "p99"):
            line(f"{stat.capitalize() if stat == 'mean' else stat.upper()} {short} (ms)", s[stat])
    if res["errors"]:
        print(" Errors ".center(w, "-"), file=file)
        for e, n in res["errors"].items():
            print(f"{n:>4} x {e}", file=file)
    print("=" * w, file=file)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (with or without /v1)")
    ap.add_argument("--model", default=None, help="model name to send (default: the first id of /v1/models)")
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (closed loop)")
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="Poisson arrivals per second (open loop); inf sends every request at once")
    ap.add_argument("--seed", type=int, default=0, help="seeds the prompt set and the arrival times")
    ap.add_argument("--prompt-words", type=int, nargs=2, default=(50, 300), metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ignore-eos", action="store_true",
                    help="send ignore_eos=true (vLLM / pyserve / llama-server extension); "
                         "short outputs then count as failures")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=0, help="untimed requests first (other prompts)")
    ap.add_argument("--client", choices=("raw", "openai"), default="raw")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--extra-body", type=json.loads, default=None, help="JSON object merged into every body")
    ap.add_argument("--no-usage", action="store_true", help="do not send stream_options.include_usage")
    ap.add_argument("--detail", action="store_true", help="per-request ITLs and texts in the JSON")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the result here")
    a = ap.parse_args(argv)

    prompts = make_prompts(a.num_prompts, a.seed, *a.prompt_words)
    warm = make_prompts(a.warmup, a.seed + 1_000_003, *a.prompt_words) if a.warmup else None
    res = run_benchmark(a.base_url, prompts, model=a.model, endpoint=a.endpoint, max_tokens=a.max_tokens,
                        ignore_eos=a.ignore_eos, temperature=a.temperature, max_concurrency=a.max_concurrency,
                        request_rate=a.request_rate, seed=a.seed, warmup_prompts=warm, client=a.client,
                        api_key=a.api_key, extra_body=a.extra_body, include_usage=not a.no_usage,
                        keep_text=a.detail, detail=a.detail)
    print_report(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.json}")
    return res


if __name__ == "__main__":
    main()
