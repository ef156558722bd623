"""pyserve.models.linear.Linear against F.linear, and the batch invariance the engine relies on."""

import pytest
import torch
import torch.nn.functional as F

from pyserve.models.linear import Linear
from tests.conftest import DEVICES

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 64, 32), (1, 576, 960), (7, 96, 40), (33, 1536, 576), (130, 64, 4096)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(device, dtype, shape, bias):
    m, k, n = shape
    gen = torch.Generator().manual_seed(m * 7 + k + n)
    w = torch.randn(n, k, generator=gen).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    with torch.inference_mode():
        got = Linear(w, b)(x)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), F.linear(x, w, b).float(), **TOL[dtype])


def test_leading_dims_and_strided_input():
    w = torch.randn(48, 32)
    x = torch.randn(3, 5, 64)[..., ::2]  # non-contiguous last dim
    torch.testing.assert_close(Linear(w)(x), F.linear(x, w), **TOL[torch.float32])


def test_cpu_fp32_weight_is_prepacked_when_onednn_is_there():
    # The CPU fast path must not silently fall back: it is most of the serving throughput (bench_linear.py).
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    lin = Linear(torch.randn(64, 32))
    assert lin.packed and lin.weight.layout == torch._mkldnn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_the_batch_it_is_in(dtype):
    # Greedy decoding of a request must not change with what else is in the batch (the engine's
    # batch-invariance test relies on it); a row's result must be bit-identical for every M.
    lin = Linear(torch.randn(3072, 576).to(dtype))
    if not lin.packed:
        pytest.skip("F.linear fallback: no invariance promised")
    x = torch.randn(600, 576).to(dtype)
    with torch.inference_mode():
        alone = lin(x[:1])
        for m in (2, 7, 8, 31, 32, 33, 64, 256, 600):
            assert torch.equal(lin(x[:m])[:1], alone), f"row 0 differs when the batch has {m} rows"
