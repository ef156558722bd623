"""Greedy tokens of pyserve and llama-server on the same GGUF and prompt token ids, side by side.

Each server is started (one at a time, as bench/compare.py does), asked for `--max-tokens` greedy tokens
after each prompt (sent as token ids, so both see the same input whatever their tokenizers do), with the
top-3 log-probabilities of each step, and stopped. Prints both token sequences, where they first differ,
and the gap between the top two candidates at each of pyserve's steps: random-weight models
(bench/make_1b_gguf.py) have near-flat logits, so a difference after a near-tie is expected rounding (of
the quantized activations, the accumulation order), not a bug.

    python bench/greedy_vs_llamacpp.py --model ~/.cache/pyserve-bench/models/random-llama-1b-Q8_0.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import compare  # noqa: E402  bench/compare.py

PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea,")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def pyserve_greedy(url: str, ids: list[int], n: int) -> tuple[list[int], list[dict[int, float]]]:
    r = post(url + "/v1/completions", {"prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                                       "logprobs": 3, "return_token_ids": True})
    choice = r["choices"][0]
    # top_logprobs are keyed by token text; the ids come from return_token_ids.
    return choice["token_ids"], [dict(d) for d in choice["logprobs"]["top_logprobs"]]


def llama_greedy(url: str, ids: list[int], n: int) -> list[int]:
    r = post(url + "/completion", {"prompt": ids, "n_predict": n, "temperature": 0, "ignore_eos": True,
                                   "return_tokens": True, "cache_prompt": False})
    return r["tokens"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--pyserve-args", default="")
    a = ap.parse_args(argv)

    from pyserve.loader import load_tokenizer

    gguf = str(Path(a.model).expanduser().resolve())
    tok = load_tokenizer(gguf)
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    longest = max(len(p) for p in prompts)
    log_dir = Path(tempfile.mkdtemp(prefix="pyserve-greedy-"))
    got: dict[str, list] = {}
    for backend in ("pyserve", "llama-server"):
        extra = a.pyserve_args.split() if backend == "pyserve" else []
        srv = compare.make_server(backend, 1, gguf, longest, a.max_tokens, log_dir, extra)
        srv.start()
        try:
            got[backend] = [pyserve_greedy(srv.url, p, a.max_tokens) if backend == "pyserve"
                            else llama_greedy(srv.url, p, a.max_tokens) for p in prompts]
        finally:
            srv.stop()
    for text, mine, theirs in zip(PROMPTS, got["pyserve"], got["llama-server"]):
        ids, tops = mine
        same = next((i for i, (x, y) in enumerate(zip(ids, theirs)) if x != y), min(len(ids), len(theirs)))
        gaps = [sorted(t.values(), reverse=True) for t in tops]
        gaps = [f"{g[0] - g[1]:.3f}" if len(g) > 1 else "-" for g in gaps]
        print(f"{text!r}:")
        print(f"  pyserve      {ids}  {tok.decode(ids)!r}")
        print(f"  llama-server {theirs}  {tok.decode(theirs)!r}")
        print(f"  agree on the first {same} of {len(ids)}; pyserve's top-1 - top-2 logprob per step: {gaps}")


if __name__ == "__main__":
    main()
