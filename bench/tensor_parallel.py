"""Tensor parallelism on one host: pyserve at --tensor-parallel-size 1, 2, ... side by side, and TP=1 against
a baseline checkout (the "no TP=1 regression" check), in interleaved rounds.

    python bench/tensor_parallel.py --model ~/.cache/pyserve-bench/models/random-llama-1b-Q8_0.gguf \\
        [--tp 1 2] [--concurrency 1 8] [--max-tokens 64] [--num-prompts N ...] [--rounds 3] \\
        [--threads 1] [--prompt-words 20 60] [--pyserve-args "..."] [--json out.json]

    # TP=1 today against the build before tensor parallelism (5f3d8c6), same run:
    git worktree add /tmp/pyserve-base 5f3d8c6 && cp pyserve/_C*.so /tmp/pyserve-base/pyserve/
    python bench/tensor_parallel.py --tp 1 --baseline-root /tmp/pyserve-base --concurrency 8 --rounds 3

Servers: one per `--tp` size (`python -m pyserve --model M -tp N`, this checkout; pyserve starts ranks
1..N-1 itself) plus, with `--baseline-root DIR`, one TP=1 server from that checkout (`--baseline-python`, default
this interpreter, run with cwd DIR and PYTHONPATH=DIR; the script checks that `import pyserve` resolves
there). Every rank gets OMP_NUM_THREADS=`--threads` (default 1): TP=1 runs with 1 thread, TP=2 with 1 thread
per rank (one core against two on a 2-core machine: compare with care). PYSERVE_* variables of the caller's
environment are dropped.

One server at a time: each round starts a server, waits for /health, warms it up (max(concurrency) requests
of 16 tokens, other prompts), measures every `--concurrency` level in turn, and stops it before the next
server starts. Memory would allow them all at once on the 23 GB development machine (after warm-up a TP=1
server of the 1B Q8_0 file measured 2.4-3.6 GB of unique memory, each TP=2 rank 1.6-3.2 GB, much of it the
KV cache, which --kv-cache-memory sizes per rank), but on 2 shared cores an idle server is not free: an idle
rank > 0 polls its shared-memory mailbox (sleeping up to 1 ms between looks), and a measured server should
have the cores to itself. The order of the servers rotates every round (A B, B A, A B ... ; with three:
A B C, B C A, C A B), so slow drift in the machine's load hits them all alike; the figures reported are the
medians over the rounds. Each level uses its own prompts (bench/serve.py's `make_prompts`, disjoint
slices of one seeded set, the same for every server and round), so the prefix cache never helps across
levels; a server is fresh each round.

Per server and level: output tok/s, TPOT p50, TTFT p50 (bench/serve.py's `run_benchmark`, closed loop,
greedy, `ignore_eos`), and from /metrics read just before and after the level:
`pyserve:tensor_parallel_collective_seconds_total` (rank 0's time inside all-reduces and the logits gather)
and `pyserve:engine_steps_total` (model steps) -> collective ms per step, steps, and the collectives' share
of the level's wall time; plus the CPU seconds of the server's process tree (all ranks, psutil) over the
wall time ("cores busy") and the 1-minute load average when the level started. A baseline without those
counters reports them as missing. The JSON (`--json`) holds every round's record, the medians, the
commands and the machine, and is rewritten after every level.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from serve import make_prompts, run_benchmark  # noqa: E402  bench/serve.py

COUNTERS = {"collective_s": "pyserve:tensor_parallel_collective_seconds_total",
            "steps": "pyserve:engine_steps_total",
            "gen_tokens": "pyserve:generation_tokens_total"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_counters(url: str) -> dict:
    """The unlabelled counters in COUNTERS from /metrics (None where the server has none)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for key, name in COUNTERS.items():
        m = re.search(r"^" + re.escape(name) + r"(?:\{\})? (\S+)$", text, re.M)
        out[key] = float(m.group(1)) if m else None
    return out


def tree_cpu_s(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) of a process and its descendants, and how many processes that is."""
    try:
        import psutil
    except ImportError:
        return float("nan"), 0
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return float("nan"), 0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total, len(procs)


def tree_memory_mib(pid: int) -> list[dict]:
    """Resident and unique (USS: not shared with another process, file pages not counted) MiB of each
    process of the tree, rank 0 first."""
    try:
        import psutil

        root = psutil.Process(pid)
        out = []
        for p in [root] + root.children(recursive=True):
            m = p.memory_full_info()
            out.append({"rss": round(m.rss / 2**20, 1), "uss": round(m.uss / 2**20, 1)})
        return out
    except Exception:  # noqa: BLE001  (informational only)
        return []


class Server:
    """One pyserve server (rank 0 and the ranks it starts): start, wait for /health, stop."""

    def __init__(self, name: str, python: str, root: Path, tp: int, model: str | None, threads: int,
                 max_num_seqs: int, extra: list[str], log_dir: Path):
        self.name, self.root, self.tp = name, root, tp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [python, "-m", "pyserve", "--port", str(self.port), "--device", "cpu",
                    "--max-num-seqs", str(max_num_seqs)]
        if model:
            self.cmd += ["--model", model]
        if tp != 1:
            self.cmd += ["--tensor-parallel-size", str(tp)]
        self.cmd += extra
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYSERVE_")}
        self.env.update(OMP_NUM_THREADS=str(threads),
                        PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def check_import(self) -> str:
        """Where `import pyserve` resolves for this server (must be under its root)."""
        out = subprocess.run([self.cmd[0], "-c", "import pyserve; print(pyserve.__file__)"], cwd=self.root,
                             env=self.env, capture_output=True, text=True, check=True).stdout.strip()
        if not Path(out).resolve().is_relative_to(self.root.resolve()):
            raise RuntimeError(f"{self.name}: pyserve imports from {out}, not from {self.root}")
        return out

    def start(self, timeout: float) -> None:
        self.port = free_port()
        i = self.cmd.index("--port")
        self.cmd[i + 1] = str(self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        log(f"start {self.name}: OMP_NUM_THREADS={self.env['OMP_NUM_THREADS']} (cwd {self.root}) "
            f"{shlex.join(self.cmd)}")
        self._log = open(self.log_path, "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=self.root, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before /health answered; "
                                   f"{self.log_path}:\n" + self.log_path.read_text(errors="replace")[-3000:])
            if time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"{self.name}: /health not 200 after {timeout} s; see {self.log_path}")
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0
        log(f"{self.name} ready in {self.startup_s:.1f} s")

    def stop(self) -> None:
        """SIGTERM to rank 0 (it drains, then stops its ranks); SIGKILL to its process group after 60 s.
        Ranks > 0 die with rank 0 in any case (PR_SET_PDEATHSIG)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        self.proc = None


def measure_level(srv: Server, prompts: list[str], c: int, a) -> dict:
    load1 = os.getloadavg()[0]
    m0, (cpu0, nproc) = read_counters(srv.url), tree_cpu_s(srv.proc.pid)
    t0 = time.perf_counter()
    res = run_benchmark(srv.url, prompts, max_tokens=a.max_tokens, ignore_eos=True, temperature=0.0,
                        max_concurrency=c, seed=a.seed, label=f"{srv.name} c={c}")
    wall = time.perf_counter() - t0
    m1, (cpu1, _) = read_counters(srv.url), tree_cpu_s(srv.proc.pid)
    d = {k: (m1[k] - m0[k]) if m0[k] is not None and m1[k] is not None else None for k in COUNTERS}
    steps, coll = d["steps"], d["collective_s"]
    rec = {
        "server": srv.name, "tp": srv.tp, "concurrency": c,
        "completed": res["completed"], "failed": res["failed"], "errors": res["errors"],
        "duration_s": res["duration_s"], "output_tokens": res["total_output_tokens"],
        "output_throughput": res["output_throughput"],
        "tpot_p50_ms": res["tpot_ms"]["p50"], "ttft_p50_ms": res["ttft_ms"]["p50"],
        "itl_p50_ms": res["itl_ms"]["p50"], "e2el_p50_ms": res["e2el_ms"]["p50"],
        "wall_s": wall, "steps": steps, "collective_s": coll, "gen_tokens": d["gen_tokens"],
        "collective_ms_per_step": 1000 * coll / steps if steps and coll is not None else None,
        "collective_share": coll / wall if coll is not None else None,
        "server_cpu_s": cpu1 - cpu0, "server_processes": nproc, "cores_busy": (cpu1 - cpu0) / wall,
        "client_cpu_s": res["client_cpu_s"], "load1_at_start": load1,
    }
    log(f"{srv.name} c={c}: {rec['output_throughput']:.1f} tok/s, TPOT p50 {_f(rec['tpot_p50_ms'])} ms, "
        f"TTFT p50 {_f(rec['ttft_p50_ms'], '.0f')} ms, {rec['failed']} failed, steps {_f(steps, '.0f')}, "
        f"collectives {_f(rec['collective_ms_per_step'], '.2f')} ms/step "
        f"({_f(None if rec['collective_share'] is None else 100 * rec['collective_share'])}% of wall), "
        f"cores busy {rec['cores_busy']:.2f}, load {load1:.2f}")
    if res["errors"]:
        log(f"errors: {res['errors']}")
    return rec


def _f(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


FIELDS = ("output_throughput", "tpot_p50_ms", "ttft_p50_ms", "collective_ms_per_step", "steps",
          "collective_share", "cores_busy", "failed", "load1_at_start")


def summarize(records: list[dict], names: list[str], levels: list[int]) -> list[dict]:
    out = []
    for c in levels:
        for name in names:
            rs = [r for r in records if r["server"] == name and r["concurrency"] == c]
            if not rs:
                continue
            row = {"server": name, "tp": rs[0]["tp"], "concurrency": c, "rounds": len(rs)}
            for k in FIELDS:
                row[k] = _median([r[k] for r in rs])
            row["output_throughput_all"] = [round(r["output_throughput"], 2) for r in rs]
            row["tpot_p50_ms_all"] = [None if r["tpot_p50_ms"] is None else round(r["tpot_p50_ms"], 2) for r in rs]
            out.append(row)
    # ratios against the first server of each level (TP=1 of this checkout when present)
    for c in levels:
        rows = [r for r in out if r["concurrency"] == c]
        ref = rows[0] if rows else None
        for r in rows:
            r["throughput_vs_" + ref["server"]] = (r["output_throughput"] / ref["output_throughput"]
                                                   if ref["output_throughput"] else None)
            r["tpot_vs_" + ref["server"]] = (r["tpot_p50_ms"] / ref["tpot_p50_ms"]
                                             if r["tpot_p50_ms"] and ref["tpot_p50_ms"] else None)
    return out


def print_table(summary: list[dict]) -> None:
    print("| server | c | rounds | output tok/s | TPOT p50 ms | TTFT p50 ms | collective ms/step | steps "
          "| collective share | cores busy | failed | tok/s vs first |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in summary:
        ratio = next((v for k, v in r.items() if k.startswith("throughput_vs_")), None)
        share = None if r["collective_share"] is None else 100 * r["collective_share"]
        print(f"| {r['server']} | {r['concurrency']} | {r['rounds']} | {r['output_throughput']:.1f} | "
              f"{_f(r['tpot_p50_ms'])} | {_f(r['ttft_p50_ms'], '.0f')} | {_f(r['collective_ms_per_step'], '.2f')} | "
              f"{_f(r['steps'], '.0f')} | {_f(share)}% | {_f(r['cores_busy'], '.2f')} | {_f(r['failed'], '.0f')} | "
              f"{_f(ratio, '.3f')} |")


def machine_info() -> dict:
    info = {"cores": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def git_rev(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or model id (default: pyserve's default model)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes (this checkout)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, nargs="+", default=None,
                    help="requests per level: one value for all, or one per --concurrency (default max(4, 2c))")
    ap.add_argument("--prompt-words", type=int, nargs=2, default=(20, 60), metavar=("MIN", "MAX"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pyserve-args", default="", help="extra arguments for every server (one string)")
    ap.add_argument("--baseline-root", default=None,
                    help="another checkout (with its extension built or copied in) to run as a TP=1 server")
    ap.add_argument("--baseline-python", default=sys.executable, help="the interpreter for --baseline-root")
    ap.add_argument("--baseline-name", default=None, help="its label (default base-<commit>)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--log-dir", default=None, help="server logs (default: a new folder in /tmp)")
    ap.add_argument("--json", default=None, metavar="PATH")
    a = ap.parse_args(argv)

    levels = a.concurrency
    if a.num_prompts is None:
        counts = [max(4, 2 * c) for c in levels]
    elif len(a.num_prompts) == 1:
        counts = a.num_prompts * len(levels)
    elif len(a.num_prompts) == len(levels):
        counts = a.num_prompts
    else:
        ap.error("--num-prompts takes one value or one per --concurrency level")
    n_warm = max(levels)
    pool = make_prompts(n_warm + sum(counts), a.seed, *a.prompt_words)
    warm, level_prompts, i = pool[:n_warm], {}, n_warm
    for c, n in zip(levels, counts):
        level_prompts[c], i = pool[i: i + n], i + n

    log_dir = Path(a.log_dir) if a.log_dir else Path(
        subprocess.run(["mktemp", "-d", "/tmp/pyserve-tp-bench.XXXX"], capture_output=True, text=True).stdout.strip())
    log_dir.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(a.pyserve_args)
    mns = max(levels)
    servers: list[Server] = []
    if a.baseline_root:
        root = Path(a.baseline_root).resolve()
        servers.append(Server(a.baseline_name or f"base-{git_rev(root) or root.name}", a.baseline_python, root, 1,
                              a.model, a.threads, mns, extra, log_dir))
    for tp in a.tp:
        servers.append(Server(f"tp{tp}", sys.executable, REPO, tp, a.model, a.threads, mns, extra, log_dir))
    # the reference row (ratios) is this checkout's TP=1 when measured, else the first server
    names = [s.name for s in servers]
    names = sorted(names, key=lambda n: (n != "tp1",))
    imports = {s.name: s.check_import() for s in servers}
    for s in servers:
        log(f"{s.name}: pyserve from {imports[s.name]}")

    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "commit": git_rev(REPO), "args": vars(a),
        "servers": {s.name: {"tp": s.tp, "root": str(s.root), "commit": git_rev(s.root), "pyserve": imports[s.name],
                             "command": s.cmd, "env": {"OMP_NUM_THREADS": str(a.threads)}} for s in servers},
        "prompts_per_level": dict(zip(map(str, levels), counts)), "log_dir": str(log_dir),
        "records": [], "startups": [], "summary": [],
    }

    def save():
        out["summary"] = summarize(out["records"], names, levels)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))

    t_all = time.perf_counter()
    for rnd in range(a.rounds):
        order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
        log(f"round {rnd + 1}/{a.rounds}: {' '.join(s.name for s in order)}")
        for srv in order:
            srv.start(a.startup_timeout)
            try:
                w = run_benchmark(srv.url, warm, max_tokens=16, ignore_eos=True, temperature=0.0,
                                  max_concurrency=max(levels))
                mem = tree_memory_mib(srv.proc.pid)
                out["startups"].append({"server": srv.name, "round": rnd + 1, "startup_s": srv.startup_s,
                                        "warmup_failed": w["failed"], "memory_mib": mem})
                log(f"{srv.name}: warm-up {w['completed']} ok, {w['failed']} failed; MiB per process "
                    + ", ".join(f"RSS {m['rss']:.0f} USS {m['uss']:.0f}" for m in mem))
                for c in levels:
                    rec = measure_level(srv, level_prompts[c], c, a)
                    rec["round"], rec["position"] = rnd + 1, order.index(srv)
                    out["records"].append(rec)
                    save()
            finally:
                srv.stop()
    out["total_s"] = time.perf_counter() - t_all
    save()
    print()
    print_table(out["summary"])
    log(f"total {out['total_s'] / 60:.1f} min; server logs in {log_dir}" + (f"; wrote {a.json}" if a.json else ""))
    return out


if __name__ == "__main__":
    main()
