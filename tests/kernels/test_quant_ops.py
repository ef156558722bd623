"""The quantized-weight ops (issue 16: quant_pack, quant_linear, quant_linear_out,
quant_dequant_rows, quantize_rows) against the `gguf` package: its quantizer
makes the weights, its dequantizer and a float64 matmul are the reference
(tests/kernels/quant_reference.py states the error bound that int8
activations imply). CPU only: the ops have no CUDA kernel by design."""

import pytest
import torch

from pyserve import _ops
from tests.kernels.quant_reference import (BLOCK_ELEMS, QTYPES, QUANTIZABLE, error_bound, expected_rms_error,
                                           gguf_blocks, gguf_dequantize, random_weight, reference_linear,
                                           weight_blocks)

TYPES = sorted(QTYPES)
NAMES = {8: "Q8_0", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


def make(n, k, ggml_type, seed=0):
    blocks = weight_blocks(n, k, ggml_type, seed)
    return blocks, gguf_dequantize(blocks, ggml_type), _ops.quant_pack(blocks, ggml_type, k)


def features(ggml_type, k):
    """k rounded up to whole blocks of ggml_type (the K-quants need 256)."""
    b = BLOCK_ELEMS[ggml_type]
    return -(-k // b) * b


def activations(m, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    # Rows of different magnitudes, and some blocks dominated by one large value.
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    return x + (torch.rand(m, k, generator=g) < 0.005) * 20 * torch.randn(m, k, generator=g)


def assert_within_bound(y, x, w_deq, bias, block=32):
    want = reference_linear(x, w_deq, bias)
    bound = error_bound(x, w_deq, block)
    assert y.dtype == torch.float32 and y.shape == want.shape
    err = (y.double() - want).abs()
    if not y.numel():
        return
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3f}x the int8-activation bound"
    rms, typical = err.pow(2).mean().sqrt().item(), expected_rms_error(x, w_deq, block).item()
    assert rms <= 2 * typical, f"rms error {rms:.3g}, twice what int8 activations explain ({typical:.3g})"


@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES.get)
@pytest.mark.parametrize("m,n,k", [(1, 8, 32), (1, 576, 576), (3, 13, 576), (5, 64, 1536), (33, 100, 96),
                                   (7, 1, 64), (300, 24, 128)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_quant_linear_matches_dequantized_matmul(ggml_type, m, n, k, with_bias):
    k = features(ggml_type, k)
    _, w_deq, packed = make(n, k, ggml_type)
    x = activations(m, k)
    bias = torch.randn(n) if with_bias else None
    y = _ops.quant_linear(x, packed, ggml_type, n, k, bias)
    assert_within_bound(y, x, w_deq, bias, BLOCK_ELEMS[ggml_type])


@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES.get)
def test_quant_linear_of_no_rows(ggml_type):
    k = features(ggml_type, 64)
    _, _, packed = make(16, k, ggml_type)
    y = _ops.quant_linear(torch.empty(0, k), packed, ggml_type, 16, k)
    assert y.shape == (0, 16) and y.dtype == torch.float32


@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES.get)
def test_quant_linear_of_strided_x(ggml_type):
    k = features(ggml_type, 96)
    _, w_deq, packed = make(40, k, ggml_type)
    x = activations(6, k + 104)[:, 50:50 + k]  # row stride k + 104
    assert_within_bound(_ops.quant_linear(x, packed, ggml_type, 40, k), x, w_deq, None, BLOCK_ELEMS[ggml_type])


@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES.get)
def test_quant_linear_out_writes_a_column_slice(ggml_type):
    n, k, m = 21, features(ggml_type, 576), 9
    _, w_deq, packed = make(n, k, ggml_type)
    x, bias = activations(m, k), torch.randn(n)
    wide = torch.full((m, n + 12), 7.0)
    out = wide[:, 5:5 + n]  # a shard's columns of a fused output
    _ops.quant_linear_out(x, packed, ggml_type, n, k, bias, out)
    assert_within_bound(out, x, w_deq, bias, BLOCK_ELEMS[ggml_type])
    assert torch.equal(out, _ops.quant_linear(x, packed, ggml_type, n, k, bias))
    assert (wide[:, :5] == 7).all() and (wide[:, 5 + n:] == 7).all()  # nothing outside the slice


@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES.get)
def test_non_finite_activations_reach_the_output(ggml_type):
    """A NaN or an infinity in a row makes that row's outputs NaN (as in an fp32 matmul, up to inf vs NaN),
    never a finite number; the other rows are untouched."""
    n, k = 24, features(ggml_type, 64)
    _, _, packed = make(n, k, ggml_type)
    x = activations(4, k)
    clean = _ops.quant_linear(x, packed, ggml_type, n, k)
    x[1, 5], x[2, k - 1] = float("nan"), float("inf")
    y = _ops.quant_linear(x, packed, ggml_type, n, k)
    assert y[1].isnan().all() and y[2].isnan().all()
    assert torch.equal(y[[0, 3]], clean[[0, 3]])


def edge_rows(k):
    """Rows that exercise the quantizers' corner cases, plus random ones."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.zeros(k), torch.full((k,), 0.3), torch.full((k,), -2.0),
            torch.linspace(-1, 1, k), torch.randn(k, generator=g) * 1e-6, torch.randn(k, generator=g) * 1e3]
    tie = torch.randn(k, generator=g)
    tie[:32] = torch.tensor([4.0, -4.0] * 16)  # equal magnitudes: the first one wins in Q4_0
    rows.append(tie)
    halves = torch.arange(k, dtype=torch.float32) % 32 - 15.5  # values on rounding ties
    rows.append(halves)
    return torch.cat([torch.stack(rows), random_weight(40, k, 4), torch.randn(8, k, generator=g) * 100])


@pytest.mark.parametrize("ggml_type", QUANTIZABLE, ids=NAMES.get)
def test_quantize_rows_is_bit_identical_to_gguf(ggml_type):
    w = edge_rows(576)
    got = _ops.quantize_rows(w, ggml_type)
    want = gguf_blocks(w, ggml_type)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("ggml_type", QUANTIZABLE, ids=NAMES.get)
def test_quantize_rows_of_no_rows(ggml_type):
    assert _ops.quantize_rows(torch.empty(0, 64), ggml_type).shape == (0, 64 // 32 * {8: 34, 2: 18, 3: 20, 6: 22, 7: 24}[ggml_type])


@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES.get)
@pytest.mark.parametrize("n,k", [(13, 576), (64, 32), (3, 1536)])
def test_dequant_rows_is_bit_identical_to_gguf(ggml_type, n, k):
    k = features(ggml_type, k)
    blocks, w_deq, packed = make(n, k, ggml_type, seed=5)
    ids = torch.tensor([n - 1, 0, n // 2, n - 1, 1 % n], dtype=torch.int64)
    got = _ops.quant_dequant_rows(packed, ids, ggml_type, n, k)
    assert got.dtype == torch.float32 and got.shape == (len(ids), k)
    assert torch.equal(got, w_deq[ids])
    assert _ops.quant_dequant_rows(packed, ids[:0], ggml_type, n, k).shape == (0, k)


@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES.get)
def test_results_do_not_depend_on_the_batch(ggml_type):
    """Row i alone, or anywhere inside batches of 1, 7, 33 and 300 rows, with one thread or two: the same bits.
    k = 2304: 300 rows are three of the driver's row blocks (256 KB of int8 activations: 112 rows)."""
    n, k = 200, features(ggml_type, 2304)
    _, _, packed = make(n, k, ggml_type)
    x, bias = activations(300, k), torch.randn(n)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([_ops.quant_linear(x[i:i + 1], packed, ggml_type, n, k, bias) for i in range(300)])
        one_thread = _ops.quant_linear(x, packed, ggml_type, n, k, bias)
        torch.set_num_threads(2)
        for size in (1, 7, 33, 300):
            for start in sorted({0, 1, 300 - size, (300 - size) // 2}):
                got = _ops.quant_linear(x[start:start + size], packed, ggml_type, n, k, bias)
                assert torch.equal(got, alone[start:start + size]), (size, start)
        assert torch.equal(one_thread, alone)
    finally:
        torch.set_num_threads(threads)


def test_validation_errors_name_the_argument():
    k, n = 64, 16
    blocks, _, packed = make(n, k, 3)
    x = activations(2, k)
    with pytest.raises(RuntimeError, match="ggml_type 99 has no quantized kernel"):
        _ops.quant_pack(blocks, 99, k)
    with pytest.raises(RuntimeError, match="blocks must be uint8"):
        _ops.quant_pack(blocks.to(torch.int16), 3, k)
    with pytest.raises(RuntimeError, match=r"blocks must have in_features / 32 \* 20 = 40 bytes per row"):
        _ops.quant_pack(blocks[:, :38].contiguous(), 3, k)
    with pytest.raises(RuntimeError, match="in_features must be a positive multiple of 32"):
        _ops.quant_pack(blocks, 3, 48)
    with pytest.raises(RuntimeError, match="x must be float32"):
        _ops.quant_linear(x.double(), packed, 3, n, k)
    with pytest.raises(RuntimeError, match="x has 32 columns but in_features is 64"):
        _ops.quant_linear(x[:, :32], packed, 3, n, k)
    with pytest.raises(RuntimeError, match=r"x's rows must be contiguous"):
        _ops.quant_linear(activations(k, 2).T, packed, 3, n, k)
    with pytest.raises(RuntimeError, match="packed has 640 bytes, but a Q4_1 weight of 17 x 64 packs to 960"):
        _ops.quant_linear(x, packed, 3, 17, k)
    with pytest.raises(RuntimeError, match="packed has 640 bytes, but a Q8_0 weight of 16 x 64 packs to 1088"):
        _ops.quant_linear(x, packed, 8, n, k)
    with pytest.raises(RuntimeError, match="in_features must be a positive multiple of 32"):
        _ops.quant_linear(x[:, :40], packed, 3, n, 40)
    with pytest.raises(RuntimeError, match=r"bias must be \[out_features\] = \[16\]"):
        _ops.quant_linear(x, packed, 3, n, k, torch.zeros(n + 1))
    with pytest.raises(RuntimeError, match="bias must be float32"):
        _ops.quant_linear(x, packed, 3, n, k, torch.zeros(n, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"out must be \[m, out_features\] = \[2, 16\]"):
        _ops.quant_linear_out(x, packed, 3, n, k, None, torch.empty(2, n - 1))
    with pytest.raises(RuntimeError, match=r"out must be \[m, out_features\] = \[2, 16\]"):
        _ops.quant_linear_out(x, packed, 3, n, k, None, torch.empty(1, n))
    with pytest.raises(RuntimeError, match="out must be float32"):
        _ops.quant_linear_out(x, packed, 3, n, k, None, torch.empty(2, n, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="out's rows must be contiguous"):
        _ops.quant_linear_out(x, packed, 3, n, k, None, torch.empty(n, 2).T)
    with pytest.raises(RuntimeError, match=r"ids\[1\] = 16 is outside \[0, out_features = 16\)"):
        _ops.quant_dequant_rows(packed, torch.tensor([0, 16]), 3, n, k)
    with pytest.raises(RuntimeError, match="ids must be int64"):
        _ops.quant_dequant_rows(packed, torch.tensor([0], dtype=torch.int32), 3, n, k)
    with pytest.raises(RuntimeError, match="w's in_features must be a multiple of 32"):
        _ops.quantize_rows(torch.zeros(2, 48), 8)
    with pytest.raises(RuntimeError, match="w must be float32"):
        _ops.quantize_rows(torch.zeros(2, 64, dtype=torch.float16), 8)
    with pytest.raises(RuntimeError, match="ggml_type 11 has no quantized kernel"):
        _ops.quantize_rows(torch.zeros(2, 256), 11)
    with pytest.raises(RuntimeError, match="quantize_rows has no quantizer for Q6_K"):
        _ops.quantize_rows(torch.zeros(2, 256), 14)
    q6k, _, _ = make(8, 256, 14)
    with pytest.raises(RuntimeError, match=r"in_features must be a positive multiple of 256 \(Q6_K blocks\), got 288"):
        _ops.quant_pack(q6k, 14, 288)


def test_opcheck():
    blocks, _, packed = make(24, 64, 2)
    x = activations(3, 64)
    torch.library.opcheck(torch.ops.pyserve.quant_pack.default, (blocks, 2, 64))
    torch.library.opcheck(torch.ops.pyserve.quant_linear.default, (x, packed, 2, 24, 64, torch.randn(24)))
    torch.library.opcheck(torch.ops.pyserve.quant_linear_out.default, (x, packed, 2, 24, 64, None, torch.empty(3, 24)))
    torch.library.opcheck(torch.ops.pyserve.quant_dequant_rows.default, (packed, torch.tensor([3, 0]), 2, 24, 64))
    torch.library.opcheck(torch.ops.pyserve.quantize_rows.default, (activations(4, 64), 8))
