"""`python -m pyserve`: bad arguments end the process with one line and exit code 2."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from pyserve.cli import parse_args

from .conftest import REPO, server_env


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyserve", *args], env=server_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,needle", [
    (["--device", "tpu"], "--device"),
    (["--model", "/nonexistent"], "/nonexistent"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--kv-cache-dtype", "int8"], "--kv-cache-dtype"),
    (["--kv-cache-dtype", "float32", "--dtype", "bfloat16"], "--kv-cache-dtype float32"),
])
def test_bad_arguments_exit_2(args, needle):
    r = _run(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pyserve: error:") and needle in lines[0]


def test_help():
    r = _run("--help")
    assert r.returncode == 0
    assert "--max-model-len" in r.stdout and "PYSERVE_MAX_MODEL_LEN" in r.stdout and "default: 8000" in r.stdout


def test_env_vars_and_flag_precedence():
    args = parse_args([], environ={"PYSERVE_PORT": "0", "PYSERVE_MAX_NUM_SEQS": "7",
                                   "PYSERVE_ENABLE_PREFIX_CACHING": "false", "PYSERVE_API_KEY": "k"})
    assert args.port == 0 and args.max_num_seqs == 7 and args.enable_prefix_caching is False and args.api_key == "k"
    args = parse_args(["--max-num-seqs", "3"], environ={"PYSERVE_MAX_NUM_SEQS": "7", "PYSERVE_PORT": "0"})
    assert args.max_num_seqs == 3


def test_device_auto_is_the_default_and_picks_what_torch_sees():
    """`--device auto` (the default, vLLM's behaviour): CUDA when torch sees a GPU, else the CPU."""
    import torch

    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert parse_args([], environ={"PYSERVE_PORT": "0"}).device == want
    assert parse_args(["--device", "auto"], environ={"PYSERVE_PORT": "0"}).device == want
    assert parse_args(["--device", "cpu"], environ={"PYSERVE_PORT": "0"}).device == "cpu"


def test_bad_env_value_exit_2():
    r = _run(PYSERVE_MAX_NUM_SEQS="-1")
    assert r.returncode == 2 and r.stderr.strip().startswith("pyserve: error: PYSERVE_MAX_NUM_SEQS")


def test_port_env_var_used_and_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run(PYSERVE_PORT=str(port))  # the env var's port is the one checked
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and f"--port {port}" in r.stderr
