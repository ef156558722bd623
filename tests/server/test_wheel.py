"""The wheel: built from this checkout with `pip wheel`, installed into a fresh venv next to the torch
it was compiled against, it serves a request with the default model from there.

Cost (2 cores): about a minute when the extension is already built, most of it torch's import in
the server and the model's load; `pip wheel` reuses the CMake build directory that `make setup`
and setup.py use for CPU builds (build/cpu, or PYSERVE_BUILD_DIR), so it only relinks. Where that
directory is missing (a CUDA-only setup), the wheel's CPU build compiles the extension from scratch
(several minutes). Deselect with -m "not wheel".
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import torch

from .conftest import REPO, SERVER_ARGS, free_port, http

pytestmark = pytest.mark.wheel


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def clean_env(**extra) -> dict:
    """This environment without anything that would point Python at the checkout or configure pyserve."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSERVE_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def build_wheel(out: Path) -> Path:
    env = clean_env(PYSERVE_TARGET_DEVICE="cpu")
    if "PYSERVE_BUILD_DIR" in os.environ:
        env["PYSERVE_BUILD_DIR"] = os.environ["PYSERVE_BUILD_DIR"]
    run(sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--no-build-isolation",
        "--no-deps", "--no-index", "-w", out, REPO, env=env, cwd=REPO, timeout=1800)
    (wheel,) = out.glob("pyserve-*.whl")
    return wheel


def make_venv(root: Path) -> Path:
    """A venv whose own site-packages is empty and which sees this environment's packages (torch,
    the default model, ...) through a .pth file, except pyserve itself (its editable install here
    would shadow the wheel's). Offline, and no copy of torch."""
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    deps = root / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if not entry.name.lower().startswith(("pyserve", "__editable__", "__pycache__")):
            (deps / entry.name).symlink_to(entry)
    venv_site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(venv_site) / "pyserve_test_deps.pth").write_text(f"{deps}\n")
    return python


def test_the_wheel_installs_and_serves(tmp_path):
    wheel = build_wheel(tmp_path / "wheels")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.startswith("pyserve/_C.") and n.endswith(".so") for n in names), names
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert f"torch=={torch.__version__.split('+')[0]}" in requires, requires

    python = make_venv(tmp_path)
    # Dependencies resolved, not skipped: every one must be met by what the venv sees, offline;
    # the torch pin among them.
    run(sys.executable, "-m", "pip", "--python", python, "install", "--disable-pip-version-check", "-q",
        "--no-index", "--no-cache-dir", wheel, env=clean_env(), timeout=300)
    where = run(python, "-c", "import pyserve._ops, pyserve; print(pyserve.__file__)", cwd=tmp_path,
                env=clean_env(), timeout=300).stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), where

    port = free_port()
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen([str(python), "-m", "pyserve", "--port", str(port), *SERVER_ARGS], cwd=tmp_path,
                            env=clean_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def output() -> str:
        log.flush()
        log.seek(0)
        return log.read()[-4000:]

    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{output()}"
            assert time.monotonic() < deadline, f"the server was not ready in 300 s:\n{output()}"
            try:
                if http("GET", url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        status, body = http("POST", url + "/v1/completions",
                            {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is",
                             "max_tokens": 4, "temperature": 0})
        assert status == 200, body
        assert body["choices"][0]["text"] and 1 <= body["usage"]["completion_tokens"] <= 4, body
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
