"""pyserve: an LLM inference server on hand-written paged-attention kernels."""

import torch  # noqa: F401  (loads libtorch before our extension links against it)

from pyserve import _C  # noqa: F401  (registers torch.ops.pyserve.*)
from pyserve import _ops  # noqa: F401  (fake kernels for torch.compile / opcheck)

from pyserve.llm import LLM  # noqa: E402
from pyserve.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "build_info"]
__version__ = "0.1.0"


def build_info() -> dict:
    """What the loaded extension was compiled with: CPU ISA, CUDA and its archs."""
    return dict(_C.build_info())
