"""Build pyserve._C with CMake + ninja against the installed torch.

PYSERVE_TARGET_DEVICE picks what is compiled:
  cpu   CPU kernels only.
  cuda  CPU and CUDA kernels; needs a CUDA build of torch and nvcc
        (CUDA_HOME, else /usr/local/cuda). Missing either is a build error.
  unset CUDA only when torch is a CUDA build, nvcc exists and a GPU is
        visible, so a CPU-only machine does not spend minutes in nvcc.
TORCH_CUDA_ARCH_LIST overrides the CUDA architectures (default 8.0;8.6;8.9;9.0).

The package's dependencies are written here rather than in pyproject.toml
because torch's is pinned to the torch this build compiles against.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# llguidance: the grammar engine of structured outputs (pyserve/structured); a minor-version range,
# as vLLM pins it, since its Python API moves between minors. jinja2 >= 3.1.6: older releases have
# sandbox escapes that a chat template could use (transformers refuses them too).
RUNTIME_DEPS = ["numpy", "safetensors", "tokenizers", "jinja2>=3.1.6", "sanic", "orjson", "prometheus-client",
                "llguidance>=1.9.1,<1.10"]


def torch_requirement() -> str:
    """torch==X.Y.Z, the torch importable now, which is the one the extension compiles against.

    _C links libtorch's C++ API, which is not stable across releases, so another torch
    (a later `pip install` that upgrades it) breaks `import pyserve._C`; vLLM pins the same way.
    The local part (+cu130, +cpu) is left off, as vLLM does: `==X.Y.Z` accepts every build of the
    release, and which one (CUDA version, CPU only) is the user's choice of index.
    """
    import torch

    return "torch==" + torch.__version__.split("+")[0]


def find_nvcc() -> Path | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    if nvcc.exists():
        return nvcc
    found = shutil.which("nvcc")
    return Path(found) if found else None


def want_cuda() -> tuple[bool, Path | None]:
    import torch

    target = os.environ.get("PYSERVE_TARGET_DEVICE", "").strip().lower()
    if target not in ("", "cpu", "cuda"):
        sys.exit(f"error: PYSERVE_TARGET_DEVICE must be 'cpu' or 'cuda', got {target!r}")
    if target == "cpu":
        return False, None
    nvcc = find_nvcc()
    if target == "cuda":
        if torch.version.cuda is None:
            sys.exit(f"error: PYSERVE_TARGET_DEVICE=cuda but torch {torch.__version__} is a CPU-only build")
        if nvcc is None:
            sys.exit("error: PYSERVE_TARGET_DEVICE=cuda but nvcc was not found in CUDA_HOME, /usr/local/cuda or PATH")
        return True, nvcc
    auto = torch.version.cuda is not None and nvcc is not None and torch.cuda.is_available()
    return auto, nvcc if auto else None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        with_cuda, nvcc = want_cuda()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        flavour = "cuda" if with_cuda else "cpu"
        build_dir = Path(os.environ.get("PYSERVE_BUILD_DIR", ROOT / "build" / flavour)).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYSERVE_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DPYSERVE_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if with_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        # Prefer the cmake and ninja installed next to this Python (the venv's).
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        subprocess.run(args, check=True, env=env)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True, env=env)


setup(
    install_requires=[torch_requirement(), *RUNTIME_DEPS],
    ext_modules=[CMakeExtension("pyserve._C")],
    cmdclass={"build_ext": CMakeBuild},
)
