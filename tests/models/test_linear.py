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
        for m in (2, 7, 8, 31, 32, 33, 41, 64, 255, 256, 257, 600):
            assert torch.equal(lin(x[:m])[:1], alone), f"row 0 differs when the batch has {m} rows"


def test_row_buckets_cover_every_row_count_with_the_smallest_bucket():
    from pyserve.models.linear import CHUNK_ROWS, ROW_BUCKETS, row_bucket

    for m in range(1, CHUNK_ROWS + 1):
        b = row_bucket(m)
        assert b in ROW_BUCKETS and b >= m and not any(m <= c < b for c in ROW_BUCKETS), m


def _malloc_in_use_mb() -> float:
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2")
    f.restype = MallInfo2
    info = f()
    return (info.uordblks + info.hblkhd) / 2 ** 20


def test_serving_any_row_count_after_warm_up_builds_nothing_new():
    # oneDNN builds and caches a primitive per input shape, ~0.6 MB each: a server that ran every row
    # count it met grew without bound (issue 13). After warm_up_shapes, no row count may add to the heap.
    lin = Linear(torch.randn(3072, 576))
    if not lin.packed:
        pytest.skip("F.linear fallback: no oneDNN primitives")
    lin.warm_up_shapes(2048)
    x = torch.randn(700, 576)
    with torch.inference_mode():
        lin(x[:5])  # the padding buffer
        before = _malloc_in_use_mb()
        for m in range(1, 700, 3):
            lin(x[:m])
        grew = _malloc_in_use_mb() - before
    assert grew < 8, f"the heap grew {grew:.1f} MB over 233 row counts"


def test_padding_buffer_made_under_inference_mode_serves_calls_outside_it():
    """The per-thread padding buffer is shared by every layer; the first call that pads may come from
    a forward pass (inference_mode) and a later one from plain code."""
    import threading

    def body(errors):
        try:
            lin = Linear(torch.randn(24, 16))
            with torch.inference_mode():
                lin(torch.randn(37, 16))  # 37 rows: padded to the 40-row bucket
            torch.testing.assert_close(lin(torch.randn(37, 16)).shape, torch.Size([37, 24]))
        except Exception as e:  # noqa: BLE001 (reported below, from the main thread)
            errors.append(e)

    errors: list[Exception] = []
    t = threading.Thread(target=body, args=(errors,))  # a fresh thread: a fresh padding buffer
    t.start()
    t.join()
    assert not errors, errors
