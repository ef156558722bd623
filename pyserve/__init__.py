"""pyserve: an LLM inference server on hand-written paged-attention kernels."""

import torch  # noqa: F401  (loads libtorch before our extension links against it)

from pyserve import _C  # noqa: F401  (registers torch.ops.pyserve.*)
from pyserve import _ops  # noqa: F401  (fake kernels for torch.compile / opcheck)

__all__ = ["LLM", "SamplingParams", "build_info"]
__version__ = "0.1.0"


def build_info() -> dict:
    """What the loaded extension was compiled with: CPU ISA, CUDA and its archs."""
    return dict(_C.build_info())


def __getattr__(name: str):
    # Lazy, so `import pyserve` (the kernels) stays cheap for tools that need only them.
    if name == "LLM":
        from pyserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pyserve.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pyserve' has no attribute {name!r}")
