"""Server startup time: process start -> the first 200 from /health, next to `python -c "import torch"`.

Each run starts a fresh `python -m pyserve --port P` (default model unless --model; more server flags after
`--`), polls GET /health every --poll-ms until it answers 200, reads the server's own phase breakdown from
GET /version (`startup.phases`, `startup.ready_seconds`), then stops the server (SIGTERM). In the same run,
interleaved with the servers so background load hits both alike, it times a fresh `python -c "import torch"`.
One untimed round of each first (page cache, .pyc files, tokenizer cache). Prints medians, min and max, the
median phase breakdown, whether the target holds (ready < import torch + 2 s), and JSON (--json PATH).

    python bench/startup.py [--runs 5] [--model PATH] [--json startup.json] [-- --max-num-seqs 32 ...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_OVER_TORCH_S = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def time_import_torch() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], env=_env(), check=True)
    return time.perf_counter() - t


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def time_server(model: str | None, extra: list[str], poll_s: float, timeout: float) -> dict:
    """One fresh server: seconds to the first 200 from /health, and its /version startup block."""
    port = free_port()
    cmd = [sys.executable, "-m", "pyserve", "--port", str(port)] + (["--model", model] if model else []) + extra
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            while True:
                try:
                    status, _ = http_get(port, "/health", timeout=2)
                    if status == 200:
                        ready = time.perf_counter() - t0
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    raise RuntimeError(f"server did not become ready (exit {proc.poll()}):\n{tail}")
                time.sleep(poll_s)
            status, body = http_get(port, "/version")
            startup = json.loads(body).get("startup", {}) if status == 200 else {}
        finally:
            stop(proc)
    return {"ready_s": ready, "server_ready_s": startup.get("ready_seconds"), "phases": startup.get("phases") or {}}


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default=None, help="served model (default: the embedded default model)")
    ap.add_argument("--poll-ms", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one server may take to get ready")
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("server_args", nargs="*", help="after --: more flags for `python -m pyserve`")
    a = ap.parse_args(argv)

    print("warm-up round (untimed) ...", flush=True)
    time_import_torch()
    time_server(a.model, a.server_args, a.poll_ms / 1000, a.timeout)
    torch_s, runs = [], []
    for i in range(a.runs):
        torch_s.append(time_import_torch())
        runs.append(time_server(a.model, a.server_args, a.poll_ms / 1000, a.timeout))
        print(f"run {i + 1}/{a.runs}: import torch {torch_s[-1]:.3f} s, /health 200 after {runs[-1]['ready_s']:.3f} s "
              f"(server says {runs[-1]['server_ready_s'] or float('nan'):.3f} s)", flush=True)

    ready = [r["ready_s"] for r in runs]
    server_ready = [r["server_ready_s"] for r in runs if r["server_ready_s"] is not None]
    names = list(dict.fromkeys(k for r in runs for k in r["phases"]))
    phases = {k: statistics.median([r["phases"].get(k, 0.0) for r in runs]) for k in names}
    t_med, r_med = statistics.median(torch_s), statistics.median(ready)
    target = t_med + TARGET_OVER_TORCH_S
    res = {"bench": "startup", "runs": a.runs, "model": a.model or "default", "server_args": a.server_args,
           "import_torch_s": _stats(torch_s), "ready_s": _stats(ready),
           "server_ready_s": _stats(server_ready) if server_ready else None,
           "phases_median_s": phases, "ready_minus_torch_s": r_med - t_med,
           "target_s": target, "target_met": r_med < target}

    print()
    print("| | median s | min s | max s |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| `python -c 'import torch'` | {t_med:.3f} | {min(torch_s):.3f} | {max(torch_s):.3f} |")
    print(f"| `python -m pyserve` to /health 200 | {r_med:.3f} | {min(ready):.3f} | {max(ready):.3f} |")
    if server_ready:
        print(f"| server's own ready_seconds | {statistics.median(server_ready):.3f} | {min(server_ready):.3f} "
              f"| {max(server_ready):.3f} |")
    print()
    print("server phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    print(f"ready - import torch: {r_med - t_med:.3f} s; target: ready < import torch + {TARGET_OVER_TORCH_S:.0f} s "
          f"= {target:.3f} s: {'met' if res['target_met'] else 'NOT met'}")
    print(json.dumps({k: v for k, v in res.items()}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.json}")
    return res


if __name__ == "__main__":
    main()
