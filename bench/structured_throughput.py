"""Structured outputs' cost while serving: output tok/s at a fixed concurrency (default 8 streams)
with and without a JSON schema, rounds interleaved against one server, plus the time the engine
spent filling grammar masks (`pyserve:structured_output_mask_seconds_total`) per constrained token.

    python bench/structured_throughput.py [--model PATH] [--concurrency 8] [--rounds 3] [--json out.json]

The schema asks for an array of at least 40 objects, so every constrained request runs to
--max-tokens, as the unconstrained ones do with ignore_eos: both rounds generate the same number of
tokens. Prompts are the serving benchmark's (bench/serve.py), through /v1/chat/completions."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import make_prompts, run_benchmark  # noqa: E402

SCHEMA = {"type": "array", "minItems": 40, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "tags", "active"],
    "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
                   "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                   "active": {"type": "boolean"}}}}
CONSTRAINED = {"response_format": {"type": "json_schema", "json_schema": {"name": "rows", "schema": SCHEMA}}}


def _mask_seconds(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    m = re.search(r"^pyserve:structured_output_mask_seconds_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16, help="requests per round")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each kind, interleaved")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    url = f"http://127.0.0.1:{a.port}"
    cmd = [sys.executable, "-m", "pyserve", "--port", str(a.port), "--device", "cpu",
           "--max-num-seqs", str(max(a.concurrency, 8))] + (["--model", a.model] if a.model else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSERVE_")}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        prompts = make_prompts(a.prompts, seed=0)
        common = dict(endpoint="chat", max_tokens=a.max_tokens, temperature=0.0, max_concurrency=a.concurrency,
                      warmup_prompts=prompts[:2])
        rows = {"free": [], "json_schema": []}
        mask_per_token = []
        for r in range(a.rounds):
            for kind in ("free", "json_schema") if r % 2 == 0 else ("json_schema", "free"):
                before = _mask_seconds(url)
                res = run_benchmark(url, prompts, ignore_eos=kind == "free",
                                    extra_body=CONSTRAINED if kind == "json_schema" else None, **common)
                rows[kind].append(res)
                tokens = res["total_output_tokens"] if "total_output_tokens" in res else None
                print(f"round {r} {kind:11s}: {res['output_throughput']:.1f} tok/s, {res['completed']} ok, "
                      f"{res['failed']} failed", flush=True)
                if kind == "json_schema" and tokens:
                    mask_per_token.append((_mask_seconds(url) - before) / tokens)
        free = statistics.median(x["output_throughput"] for x in rows["free"])
        constrained = statistics.median(x["output_throughput"] for x in rows["json_schema"])
        summary = {"concurrency": a.concurrency, "max_tokens": a.max_tokens, "rounds": a.rounds,
                   "free_tok_s": free, "json_schema_tok_s": constrained, "ratio": constrained / free,
                   "mask_us_per_token": 1e6 * statistics.median(mask_per_token) if mask_per_token else None}
        print(json.dumps(summary, indent=2))
        if a.json:
            Path(a.json).write_text(json.dumps({"summary": summary, "rounds": rows}, indent=2, default=str))
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
