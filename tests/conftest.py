import pyserve._ops  # noqa: F401  (loads the extension before any test touches torch.ops.pyserve)
import pytest
import torch

CUDA = torch.cuda.is_available()

# Every kernel test runs on both devices; the CUDA half skips (not vanishes)
# on machines without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU"))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
