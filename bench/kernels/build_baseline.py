"""Build the CPU kernels of an older commit as a second library whose ops live
in the namespace ``torch.ops.pyserve_baseline``, so that a benchmark can time
the old and the new kernel side by side in one process (interleaved calls, so
that a noisy machine slows both alike).

    python bench/kernels/build_baseline.py [REV]      # default: HEAD; prints the .so path
    python bench/kernels/bench_attention.py --baseline "$(python bench/kernels/build_baseline.py HEAD)"

The sources of REV (``git archive``) go to ~/.cache/pyserve-bench/baseline/<sha>/,
``TORCH_LIBRARY(pyserve`` and ``TORCH_LIBRARY_IMPL(pyserve`` are renamed to
``pyserve_baseline``, and the extension is built CPU-only with the same CMake
project (same flags, same CPU ISA choice). The library is loaded with
``torch.ops.load_library``; its Python module is never imported, so the two
copies of the C++ code do not meet (both are loaded RTLD_LOCAL).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "pyserve_baseline"


def build(rev: str = "HEAD") -> Path:
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    src = Path(os.path.expanduser("~/.cache/pyserve-bench/baseline")) / sha
    lib = next(iter(sorted((src / "out").glob("_C*.so"))), None) if (src / "out").exists() else None
    if lib is not None:
        return lib
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", sha, "csrc", "cmake", "CMakeLists.txt"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(src)
    for path in src.glob("csrc/**/*.cpp"):
        text = path.read_text()
        renamed = re.sub(r"TORCH_LIBRARY(_IMPL)?\(pyserve,", lambda m: f"TORCH_LIBRARY{m.group(1) or ''}({NAMESPACE},",
                         text)
        if renamed != text:
            path.write_text(renamed)
    build_dir = src / "build"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-G", "Ninja",
                    f"-DPython_EXECUTABLE={sys.executable}", "-DPYSERVE_WITH_CUDA=OFF",
                    f"-DPYSERVE_OUTPUT_DIR={src / 'out'}", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, env=env, stdout=sys.stderr)
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True, env=env,
                   stdout=sys.stderr)
    return next(iter(sorted((src / "out").glob("_C*.so"))))


def load(path: str | os.PathLike):
    """Load a library built by build() and return its op namespace."""
    import torch

    torch.ops.load_library(str(path))
    return getattr(torch.ops, NAMESPACE)


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "HEAD"))
