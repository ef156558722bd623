"""A 1B-class Llama GGUF with random weights for benchmarks, as F16 and, with llama.cpp's llama-quantize, Q8_0
and Q4_K_M.

The default model (135M) is small enough that per-step overhead hides the kernels; this file has
Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32 query / 8 KV heads of 64, intermediate 8192, rope theta
500000, RMS eps 1e-5, tied embeddings) and the default model's tokenizer, vocabulary (49152) and chat template,
copied from its GGUF. Llama 3.2's llama3 rope scaling is left out: it changes no shape and no cost.

Weights are normal(0, 0.02) from a fixed seed (one generator per tensor, so each tensor is the same whatever
the order), norms are 1: with a norm before every matmul, activations stay O(1) through the 16 layers, and
logits come out finite with a spread of about 1 (near-flat: greedy picks among near-ties).

    python bench/make_1b_gguf.py [--out-dir ~/.cache/pyserve-bench/models] [--types Q8_0 Q4_K_M] [--seed 0]

Steps whose output file exists are skipped. Tensors are generated and written one at a time (the largest,
the embedding, is 400 MB as fp32), so the peak RSS is about 1.2 GB (torch imported, the embedding in fp32 and F16).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ARCH = "llama"
SHAPES = dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192)
ROPE_THETA = 500000.0
RMS_EPS = 1e-5
CONTEXT = 4096
STD = 0.02
NAME = "random-llama-1b"
DEFAULT_OUT = Path(os.environ.get("PYSERVE_BENCH_CACHE", Path.home() / ".cache" / "pyserve-bench")) / "models"


def tensor_plan(vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) in llama.cpp's order; a matrix's numpy shape is (out, in), as gguf-py takes it."""
    h, i = SHAPES["hidden"], SHAPES["intermediate"]
    q, kv = SHAPES["heads"] * SHAPES["head_dim"], SHAPES["kv_heads"] * SHAPES["head_dim"]
    plan = [("token_embd.weight", (vocab, h))]  # no output.weight: the LM head is tied to the embedding
    for b in range(SHAPES["layers"]):
        p = f"blk.{b}."
        plan += [(p + "attn_norm.weight", (h,)), (p + "attn_q.weight", (q, h)), (p + "attn_k.weight", (kv, h)),
                 (p + "attn_v.weight", (kv, h)), (p + "attn_output.weight", (h, q)),
                 (p + "ffn_norm.weight", (h,)), (p + "ffn_gate.weight", (i, h)), (p + "ffn_up.weight", (i, h)),
                 (p + "ffn_down.weight", (h, i))]
    return plan + [("output_norm.weight", (h,))]


def make_tensor(index: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Norm vectors (1-D) are ones in F32, as llama.cpp's converter keeps them; matrices normal(0, STD) in F16."""
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([seed, index])
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= STD
    return x.astype(np.float16)


def copy_tokenizer(writer, source: str) -> int:
    """Every tokenizer.* key of `source` (tokens, merges, types, special ids, chat template...) into `writer`;
    returns the vocabulary size."""
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(source)
    vocab = None
    for key, field in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
        if key == "tokenizer.ggml.tokens":
            vocab = len(field.data)
    assert vocab, f"{source} has no tokenizer.ggml.tokens"
    return vocab


def write_f16(path: Path, source: str, seed: int) -> None:
    import gguf

    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, ARCH)
    vocab = copy_tokenizer(w, source)
    w.add_name(f"{NAME} (random weights, Llama-3.2-1B shapes, seed {seed})")
    w.add_type("model")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(SHAPES["hidden"])
    w.add_block_count(SHAPES["layers"])
    w.add_feed_forward_length(SHAPES["intermediate"])
    w.add_head_count(SHAPES["heads"])
    w.add_head_count_kv(SHAPES["kv_heads"])
    w.add_rope_dimension_count(SHAPES["head_dim"])
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_vocab_size(vocab)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    plan = tensor_plan(vocab)
    # Header and tensor infos first, then each tensor generated, written and dropped in turn.
    for name, shape in plan:
        dt = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for index, (name, shape) in enumerate(plan):
        w.write_tensor_data(make_tensor(index, shape, seed))
    w.close()
    os.replace(tmp, path)
    n = sum(int(np.prod(s)) for _, s in plan)
    print(f"  {n / 1e9:.3f} B parameters, vocabulary {vocab}")


def quantize(src: Path, dst: Path, qtype: str) -> None:
    import compare  # bench/compare.py: the cached llama.cpp build

    tool = compare.ensure_llama_tool("llama-quantize")
    tmp = dst.with_suffix(".tmp")
    # It logs a line per tensor: kept whole only when it fails; otherwise its size summary is enough.
    r = subprocess.run([str(tool), str(src), str(tmp), qtype, str(os.cpu_count() or 1)], capture_output=True,
                       text=True)
    if r.returncode:
        sys.exit(f"{tool} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    for line in (r.stdout + r.stderr).splitlines():
        if "model size" in line or "quant size" in line:
            print("  " + line.split(":", 1)[-1].strip())
    os.replace(tmp, dst)


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--types", nargs="*", default=["Q8_0", "Q4_K_M"], help="llama-quantize types to make")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", default=None,
                    help="GGUF to copy the tokenizer from (default: the default model's)")
    a = ap.parse_args(argv)

    from pyserve.loader import default_gguf_path

    a.out_dir = a.out_dir.expanduser()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    f16 = a.out_dir / f"{NAME}-F16.gguf"
    outs = [(f16, lambda p: write_f16(p, a.tokenizer_from or str(default_gguf_path()), a.seed))]
    for qt in a.types:
        outs.append((a.out_dir / f"{NAME}-{qt}.gguf", lambda p, qt=qt: quantize(f16, p, qt)))
    for path, make in outs:
        if path.exists():
            print(f"{path}: exists, {path.stat().st_size / 2**30:.2f} GiB (skipped)")
            continue
        print(f"{path}: writing ...", flush=True)
        t = time.perf_counter()
        make(path)
        print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s", flush=True)
    return [p for p, _ in outs]


if __name__ == "__main__":
    main()
