"""llguidance against xgrammar as pyserve's grammar backend for structured outputs (issue 17).

For each vocabulary (the default model's, 49152 tokens; Llama 3's, 128256) and each library, a
fresh Python process (so imports and memory are its own) measures:
  import        importing the library after torch (pyserve imports torch anyway)
  tokenizer     building the library's per-model tokenizer from pyserve's vocabulary as bytes
                (the bytes themselves, pyserve/structured/vocab.py, are shared and timed apart)
  compile       a grammar: small pydantic-style schema, 32-property order schema ($ref, anyOf,
                patterns, formats), json_object, a regex, a 30-way choice, a Lark grammar;
                the first compile (cold) and the median of the next ones (wall clock, and the
                CPU time of all the process's threads); compile caches off
  matcher       a matcher from the compiled grammar, and its first mask (thread CPU time)
  per token     (this thread's CPU time, so that other processes on the machine do not count)
                median / p90 / max of one mask fill (a [V/32] int32 row, the sample op's
                layout) + one token advance, walking a valid output token by token, then EOS,
                with a fresh matcher (as each request has); "warm": the same matcher reset and
                walked again (what the caches a matcher builds as it goes are worth)
  memory        malloc'd bytes (mallinfo2) for the tokenizer, for it plus one compiled grammar of
                each kind, and for 100 live matchers of the large schema that each walked a whole
                output; RSS after compiling, and the peak
  coverage      JSON Schema features: refused at compile, enforced (the valid instance walks, the
                invalid one is cut off), ignored (both walk), or wrong (the valid one is cut off)
Both libraries are set up as vLLM sets them up: llguidance with whitespace_flexible, xgrammar with
any_whitespace=True (strict_mode left at its default, True) and 8 compiler threads.

    python bench/structured_backends.py [--vocabs smollm2,llama3] [--repeat 5] [--json out.json]

Llama 3's vocabulary is llama.cpp's ggml-vocab-llama-bpe.gguf, from the tests' cache
(`python tests/llamacpp.py` fills it); the 1B bench GGUF has the default model's vocabulary.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

BACKENDS = ("llguidance", "xgrammar")
LLAMA3_VOCAB = "llama.cpp/0.3.36/models/ggml-vocab-llama-bpe.gguf"


def vocab_path(name: str) -> str:
    if name == "smollm2":
        from pyserve.loader.gguf_weights import default_gguf_path

        return default_gguf_path()
    if name == "llama3":
        cache = Path(os.environ.get("PYSERVE_TEST_CACHE", Path.home() / ".cache" / "pyserve-tests"))
        path = cache / LLAMA3_VOCAB
        if not path.exists():
            sys.exit(f"{path}: missing (run `python tests/llamacpp.py` once)")
        return str(path)
    return name  # a GGUF path


def eos_ids(name: str, tok) -> list[int]:
    if name == "llama3":
        return [128009, 128001]  # <|eot_id|>, <|end_of_text|>
    return [tok.eos_token_id]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_mb() -> float:
    """Bytes malloc has handed out and not taken back (both libraries allocate through malloc: Rust's
    default allocator, C++'s new), in MiB: unlike RSS, freed and reused memory does not hide growth."""
    mi = _libc.mallinfo2()
    return (mi.uordblks + mi.hblkhd) / 2**20


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) in MiB."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


# ---------------------------------------------------------------------------------------------
# One library behind four calls, so that the measuring code is the same for both.


class LLG:
    def __init__(self, tok, tv, eos, vocab_size):
        t = time.perf_counter()
        import llguidance
        self.import_s = time.perf_counter() - t
        self.llg = llguidance
        self.vocab_size, self.eos = vocab_size, eos
        tokens, special = tv.tokens, sorted(tv.special_ids)

        class Wrapper:
            eos_token_id = eos[0]
            bos_token_id = tok.bos_token_id

            def __init__(self):
                self.tokens = tokens
                self.special_token_ids = special

            def __call__(self, s):
                s = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
                return tok.tokenizer.encode(s, add_special_tokens=False).ids

        t = time.perf_counter()
        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapper()), eos_token=list(eos))
        self.setup_s = time.perf_counter() - t
        self.limits = llguidance.LLParserLimits(verbose_errors=False)

    def compile(self, kind, value):
        L = self.llg.LLMatcher
        opts = {"whitespace_flexible": True}
        if kind == "json_schema":
            g = L.grammar_from_json_schema(json.dumps(value), defaults=opts)
        elif kind == "json_object":
            g = L.grammar_from_json_schema('{"type": "object"}', defaults=opts)
        elif kind == "regex":
            g = self.llg.grammar_from("regex", value)
        elif kind == "choice":
            g = self.llg.grammar_from("choice", value)
        else:
            g = self.llg.grammar_from("grammar", value)
        m = L(self.tok, g, log_level=0, limits=self.limits)
        if m.is_error():
            raise ValueError(m.get_error().splitlines()[0])
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, m, row):
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def accept(self, m, t):
        return m.consume_token(t)

    def terminated(self, m):
        return m.is_stopped()


class XGR:
    def __init__(self, tok, tv, eos, vocab_size):
        t = time.perf_counter()
        import xgrammar

        self.import_s = time.perf_counter() - t
        self.xgr = xgrammar
        self.vocab_size, self.eos = vocab_size, eos
        # Special tokens as b"": xgrammar never allows an empty token (its own HF loader does the same).
        vocab = [b"" if i in tv.special_ids else b for i, b in enumerate(tv.tokens)]
        t = time.perf_counter()
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(eos))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=8, cache_enabled=False)
        self.setup_s = time.perf_counter() - t

    def compile(self, kind, value):
        c = self.compiler
        if kind == "json_schema":
            return c.compile_json_schema(json.dumps(value), any_whitespace=True)
        if kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=True)
        if kind == "regex":
            return c.compile_regex(value)
        if kind == "choice":  # vLLM: choice -> an EBNF alternation of JSON-escaped strings
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in value))
        return c.compile_lark(value)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, row):
        m.fill_next_token_bitmask(row.view(1, -1), 0)

    def accept(self, m, t):
        return m.accept_token(t)

    def terminated(self, m):
        return m.is_terminated()


# ---------------------------------------------------------------------------------------------


def grammars():
    from structured_schemas import (CHOICE_INSTANCE, CHOICES, JSON_OBJECT_INSTANCE, LARGE_INSTANCE, LARGE_SCHEMA,
                                    LARK, LARK_INSTANCE, REGEX, REGEX_INSTANCE, SMALL_INSTANCE, SMALL_SCHEMA)

    return [
        ("small schema", "json_schema", SMALL_SCHEMA, json.dumps(SMALL_INSTANCE)),
        ("large schema", "json_schema", LARGE_SCHEMA, json.dumps(LARGE_INSTANCE)),
        ("json_object", "json_object", None, json.dumps(JSON_OBJECT_INSTANCE)),
        ("regex", "regex", REGEX, REGEX_INSTANCE),
        ("choice (30)", "choice", CHOICES, CHOICE_INSTANCE),
        ("lark", "grammar", LARK, LARK_INSTANCE),
    ]


def walk(b, m, ids, row, times=None) -> int:
    """Fill + accept each id (timed into `times`); 1 if the mask refused one or the matcher rejected
    it (the walk stops there), else 0."""
    from pyserve.structured.backend import unpack_bitmask

    for t in ids:
        t0 = time.thread_time_ns()
        b.fill(m, row)
        ok = b.accept(m, t)
        dt = time.thread_time_ns() - t0
        if times is not None:
            times.append(dt / 1000)
        if not ok or not bool(unpack_bitmask(row, b.vocab_size)[t]):
            return 1
    return 0


def walk_ok(b, compiled, ids, row) -> bool:
    """Whether every id is allowed and accepted."""
    m = b.matcher(compiled)
    for t in ids:
        b.fill(m, row)
        if not row[t // 32].item() >> (t % 32) & 1 or not b.accept(m, t):
            return False
    return True


def worker(backend: str, vocab: str, repeat: int) -> dict:
    import torch
    from structured_schemas import LARGE_INSTANCE

    from pyserve.loader.gguf_tokenizer import load_tokenizer
    from pyserve.structured.vocab import plain_encoder, token_bytes

    tok = load_tokenizer(vocab_path(vocab))
    plain = plain_encoder(tok.tokenizer)  # text as a model writes it mid-output (no SentencePiece space in front)

    def encode(text: str) -> list[int]:
        return plain.encode(text, add_special_tokens=False).ids

    V = tok.tokenizer.get_vocab_size()
    eos = eos_ids(vocab, tok)
    t = time.perf_counter()
    tv = token_bytes(tok.tokenizer, V, tuple(eos))
    bytes_s = time.perf_counter() - t
    rss0, _ = rss_mb()
    heap0 = heap_mb()
    b = (LLG if backend == "llguidance" else XGR)(tok, tv, eos, V)
    rss_setup, _ = rss_mb()
    heap_setup = heap_mb()
    row = torch.zeros((V + 31) // 32, dtype=torch.int32)
    res = {"backend": backend, "vocab": vocab, "vocab_size": V, "bytes_s": bytes_s, "import_s": b.import_s,
           "setup_s": b.setup_s, "rss_before_mb": rss0, "rss_setup_mb": rss_setup, "grammars": {},
           "heap_setup_mb": heap_setup - heap0}
    compiled_all = []
    for name, kind, value, text in grammars():
        ids = encode(text) + [eos[0]]
        g = {"tokens": len(ids)}
        try:
            t, c = time.perf_counter(), time.process_time()
            compiled = b.compile(kind, value)
            g["compile_cold_ms"] = (time.perf_counter() - t) * 1e3
            g["compile_cold_cpu_ms"] = (time.process_time() - c) * 1e3
        except Exception as e:
            g["error"] = str(e).splitlines()[0][:200]
            res["grammars"][name] = g
            continue
        compiled_all.append(compiled)
        warm, warm_cpu = [], []
        for _ in range(repeat):
            t, c = time.perf_counter(), time.process_time()
            b.compile(kind, value)
            warm.append((time.perf_counter() - t) * 1e3)
            warm_cpu.append((time.process_time() - c) * 1e3)
        g["compile_ms"] = statistics.median(warm)
        g["compile_cpu_ms"] = statistics.median(warm_cpu)
        mt, first, per_tok, warm_tok, rejected = [], [], [], [], 0
        for w in range(max(3, repeat)):
            t = time.thread_time_ns()
            m = b.matcher(compiled)
            mt.append((time.thread_time_ns() - t) / 1e3)
            t = time.thread_time_ns()
            b.fill(m, row)
            first.append((time.thread_time_ns() - t) / 1e3)
            m = b.matcher(compiled)
            times: list[float] = []
            rejected += walk(b, m, ids, row, times)
            per_tok += times
            if w == 0:
                g["terminated"] = b.terminated(m)
            # The same matcher again from its start: what the lexer / mask caches it built save.
            m.reset()
            times = []
            rejected += walk(b, m, ids, row, times)
            warm_tok += times
        per_tok.sort()
        warm_tok.sort()
        g.update(warm_median_us=statistics.median(warm_tok), warm_p90_us=warm_tok[int(0.9 * len(warm_tok))])
        g.update(matcher_us=statistics.median(mt), first_mask_us=statistics.median(first),
                 tok_median_us=statistics.median(per_tok), tok_p90_us=per_tok[int(0.9 * len(per_tok))],
                 tok_max_us=per_tok[-1], tok_mean_us=statistics.fmean(per_tok), rejected=rejected)
        res["grammars"][name] = g
    res["rss_compiled_mb"] = rss_mb()[0]
    res["heap_compiled_mb"] = heap_mb() - heap0  # the tokenizer and one compiled grammar of each kind
    large = next((c for c, (n, *_) in zip(compiled_all, grammars()) if n == "large schema"), None)
    if large is not None:
        ids = encode(json.dumps(LARGE_INSTANCE))
        before = heap_mb()
        live = [b.matcher(large) for _ in range(100)]
        for m in live:  # each holds the state of a whole output
            walk(b, m, ids, row)
        res["heap_100_matchers_mb"] = heap_mb() - before
        del live
    res["rss_peak_mb"] = rss_mb()[1]
    res["coverage"] = coverage(b, encode, row)
    return res


def coverage(b, encode, row) -> dict:
    from structured_schemas import COVERAGE

    out = {}
    for name, schema, good, bad in COVERAGE:
        try:
            c = b.compile("json_schema", schema)
        except Exception as e:
            out[name] = "refused: " + str(e).splitlines()[0][:120]
            continue

        def enc(v) -> list[int]:
            return encode(json.dumps(v))

        ok_good = walk_ok(b, c, enc(good), row) and _can_end(b, c, enc(good), row)
        ok_bad = walk_ok(b, c, enc(bad), row) and _can_end(b, c, enc(bad), row)
        out[name] = "wrong" if not ok_good else "ignored" if ok_bad else "enforced"
    return out


def _can_end(b, compiled, ids, row) -> bool:
    """Whether an EOS is allowed after the ids."""
    m = b.matcher(compiled)
    for t in ids:
        b.fill(m, row)
        b.accept(m, t)
    b.fill(m, row)
    eos = b.eos[0]
    return bool(row[eos // 32].item() >> (eos % 32) & 1)


# ---------------------------------------------------------------------------------------------


def run_worker(backend: str, vocab: str, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--vocabs", vocab, "--repeat", str(repeat)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{backend}/{vocab} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def report(results: list[dict]) -> None:
    for vocab in dict.fromkeys(r["vocab"] for r in results):
        rs = [r for r in results if r["vocab"] == vocab]
        print(f"\n== vocabulary {vocab} ({rs[0]['vocab_size']} tokens; its bytes: {rs[0]['bytes_s'] * 1e3:.0f} ms) ==")
        print(f"{'':14}" + "".join(f"{r['backend']:>24}" for r in rs))
        rows = [("import (ms)", lambda r: fmt(r["import_s"] * 1e3, ".0f")),
                ("tokenizer (ms)", lambda r: fmt(r["setup_s"] * 1e3, ".0f")),
                ("heap tokenizer", lambda r: fmt(r["heap_setup_mb"]) + " MiB"),
                ("heap +grammars", lambda r: fmt(r["heap_compiled_mb"]) + " MiB"),
                ("100 matchers", lambda r: fmt(r.get("heap_100_matchers_mb")) + " MiB"),
                ("RSS +all", lambda r: fmt(r["rss_compiled_mb"] - r["rss_before_mb"]) + " MiB"),
                ("peak RSS", lambda r: fmt(r["rss_peak_mb"], ".0f") + " MiB")]
        for label, f in rows:
            print(f"{label:14}" + "".join(f"{f(r):>24}" for r in rs))
        print(f"\n{'grammar':14}{'backend':>11} {'tokens':>6} {'cold':>7} {'compile':>8} {'CPU':>7} "
              f"{'matcher':>9} {'1st mask':>9} {'tok med':>8} {'tok p90':>8} {'tok max':>8} {'warm med':>8} "
              f"{'warm p90':>8}  rej")
        print(f"{'':14}{'':>11} {'':>6} {'ms':>7} {'ms':>8} {'ms':>7} {'us':>9} {'us':>9}" + f" {'us':>8}" * 5)
        for name in rs[0]["grammars"]:
            for r in rs:
                g = r["grammars"][name]
                if "error" in g:
                    print(f"{name:14}{r['backend']:>11}  refused: {g['error'][:80]}")
                    continue
                print(f"{name:14}{r['backend']:>11} {g['tokens']:>6} {g['compile_cold_ms']:>7.2f} "
                      f"{g['compile_ms']:>8.2f} {g['compile_cpu_ms']:>7.2f} "
                      f"{g['matcher_us']:>9.1f} {g['first_mask_us']:>9.1f} {g['tok_median_us']:>8.1f} "
                      f"{g['tok_p90_us']:>8.1f} {g['tok_max_us']:>8.0f} {g['warm_median_us']:>8.1f} "
                      f"{g['warm_p90_us']:>8.1f}  {g['rejected']}")
        print(f"\n{'JSON Schema feature':48}" + "".join(f"{r['backend']:>14}" for r in rs))
        for feat in rs[0]["coverage"]:
            cells = [r["coverage"][feat] for r in rs]
            short = ["refused" if c.startswith("refused") else c for c in cells]
            print(f"{feat:48}" + "".join(f"{c:>14}" for c in short))
        for r in rs:
            for feat, c in r["coverage"].items():
                if c.startswith("refused"):
                    print(f"  {r['backend']}: {feat}: {c}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", default="smollm2,llama3")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.vocabs, args.repeat)))
        return
    results = []
    for vocab in args.vocabs.split(","):
        for backend in args.backends.split(","):
            print(f"measuring {backend} on {vocab} ...", file=sys.stderr, flush=True)
            results.append(run_worker(backend, vocab, args.repeat))
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
