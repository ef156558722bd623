"""rms_norm, fused_add_rms_norm, silu_and_mul and rotary_embedding against
Hugging Face Llama's own PyTorch formulation of each (same dtype, same
rounding points), on every device."""

import pytest
import torch
import torch.nn.functional as F

from pyserve import _ops
from tests.conftest import DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol): one rounding step of the storage dtype, relative to values of magnitude ~1-4.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3.2e-2, 1.6e-2)}


def assert_close(got, want):
    atol, rtol = TOLERANCES[want.dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def reference_rms_norm(x, weight, eps):  # transformers' LlamaRMSNorm.forward
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def reference_rotary(positions, x, cos, sin):  # transformers' apply_rotary_pos_emb on one tensor
    c = torch.cat([cos, cos], dim=-1)[positions].unsqueeze(1)
    s = torch.cat([sin, sin], dim=-1)[positions].unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rotated * s


def tables(max_positions, head_dim, dtype, device):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return freqs.cos().to(device, dtype), freqs.sin().to(device, dtype)


def randn(*shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(0, 64), (1, 576), (5, 64), (37, 576), (300, 96), (3, 4096)])
def test_rms_norm(device, dtype, rows, hidden):
    x = randn(rows, hidden, dtype=dtype, device=device) * 3
    w = randn(hidden, dtype=dtype, device=device, seed=1)
    assert_close(_ops.rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_of_strided_rows(device):
    x = randn(6, 200, dtype=torch.float32, device=device)[:, 8:136]  # row stride 200
    w = randn(128, dtype=torch.float32, device=device, seed=1)
    assert_close(_ops.rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(0, 64), (1, 576), (33, 576), (130, 96)])
def test_fused_add_rms_norm(device, dtype, rows, hidden):
    x = randn(rows, hidden, dtype=dtype, device=device)
    residual = randn(rows, hidden, dtype=dtype, device=device, seed=2) * 4
    w = randn(hidden, dtype=dtype, device=device, seed=1)
    want_residual = x + residual  # in the storage dtype, as transformers adds
    want = reference_rms_norm(want_residual, w, 1e-5)
    _ops.fused_add_rms_norm(x, residual, w, 1e-5)
    torch.testing.assert_close(residual, want_residual, atol=0, rtol=0)  # the add rounds exactly as torch's
    assert_close(x, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(0, 8), (1, 1536), (7, 13), (64, 1536), (300, 40)])
def test_silu_and_mul(device, dtype, rows, d):
    x = randn(rows, 2 * d, dtype=dtype, device=device) * 4
    gate, up = x.chunk(2, dim=-1)
    assert_close(_ops.silu_and_mul(x), F.silu(gate) * up)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_saturates_cleanly(device):
    x = torch.tensor([[-200.0, -90.0, 0.0, 90.0, 200.0, 1.0, 1.0, 1.0, 1.0, 1.0] * 2], device=device)
    x = x[:, :20]  # gate = first 10, up = last 10
    out = _ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    assert torch.isfinite(out).all()
    assert_close(out, F.silu(gate) * up)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_of_strided_rows(device):
    x = randn(9, 100, dtype=torch.float32, device=device)[:, :64]
    gate, up = x.chunk(2, dim=-1)
    assert_close(_ops.silu_and_mul(x), F.silu(gate) * up)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 128), (2, 1, 80)])
def test_rotary_on_a_fused_qkv_projection(device, dtype, heads, kv_heads, head_dim):
    # The model rotates q and k in place inside one [tokens, (heads + 2 kv_heads) * head_dim] projection.
    tokens, max_positions = 23, 4096
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device) * 2
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    positions = torch.tensor([0, 1, 2, 4095, 17] + list(range(100, 118)), device=device)
    cos, sin = tables(max_positions, head_dim, dtype, device)
    want_q, want_k = reference_rotary(positions, q, cos, sin), reference_rotary(positions, k, cos, sin)
    _ops.rotary_embedding(positions, q, k, cos, sin)
    assert_close(q, want_q)
    assert_close(k, want_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before), "rotary wrote into v"


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_with_no_tokens(device):
    q, k = torch.empty(0, 2, 8, device=device), torch.empty(0, 1, 8, device=device)
    cos, sin = tables(16, 8, torch.float32, device)
    _ops.rotary_embedding(torch.empty(0, dtype=torch.int64, device=device), q, k, cos, sin)


def test_rotary_position_outside_the_tables_is_an_error_on_cpu():
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    cos, sin = tables(16, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"positions\[2\] = 16 is outside the rotary tables \(16 positions\)"):
        _ops.rotary_embedding(torch.tensor([0, 5, 16]), q, k, cos, sin)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_rotary_position_outside_the_tables_leaves_the_token_on_cuda():
    q, k = torch.randn(2, 2, 8, device="cuda"), torch.randn(2, 1, 8, device="cuda")
    q0, k0 = q.clone(), k.clone()
    cos, sin = tables(16, 8, torch.float32, "cuda")
    _ops.rotary_embedding(torch.tensor([3, 16], device="cuda"), q, k, cos, sin)
    assert torch.equal(q[1], q0[1]) and torch.equal(k[1], k0[1])
    assert_close(q[:1], reference_rotary(torch.tensor([3], device="cuda"), q0[:1], cos, sin))


def _bad(fn, message):
    with pytest.raises(RuntimeError, match=message):
        fn()


def test_bad_arguments_name_the_argument():
    x, w = torch.randn(4, 64), torch.randn(64)
    _bad(lambda: _ops.rms_norm(x, torch.randn(32), 1e-5), "weight has 32 entries but input rows have 64")
    _bad(lambda: _ops.rms_norm(x, w.half(), 1e-5), "weight dtype")
    _bad(lambda: _ops.rms_norm(x.t(), torch.randn(4), 1e-5), r"input must have dense rows")
    _bad(lambda: _ops.rms_norm(x.view(2, 2, 64), w, 1e-5), "input must be 2-D")
    _bad(lambda: _ops.rms_norm(x.long(), w, 1e-5), "input must be float32, float16 or bfloat16")
    _bad(lambda: _ops.rms_norm(x, w, -1.0), "eps must be finite and >= 0")
    _bad(lambda: _ops.fused_add_rms_norm(x, torch.randn(3, 64), w, 1e-5), "residual shape")
    _bad(lambda: _ops.fused_add_rms_norm(x, torch.randn(4, 64).half(), w, 1e-5), "residual dtype")
    _bad(lambda: _ops.fused_add_rms_norm(torch.randn(4, 128)[:, :64], torch.randn(4, 64), w, 1e-5),
         "input must be contiguous")
    _bad(lambda: _ops.silu_and_mul(torch.randn(4, 7)), "input's last dimension must be even")
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    cos, sin = tables(16, 8, torch.float32, "cpu")
    pos = torch.tensor([0, 1, 2])
    _bad(lambda: _ops.rotary_embedding(pos.int(), q, k, cos, sin), "positions must be Long")
    _bad(lambda: _ops.rotary_embedding(pos[:2], q, k, cos, sin), "positions has 2 entries but query has 3 tokens")
    _bad(lambda: _ops.rotary_embedding(pos, q, torch.randn(3, 1, 6), cos, sin), "key head_dim 6 differs")
    _bad(lambda: _ops.rotary_embedding(pos, q, k.half(), cos, sin), "key dtype")
    _bad(lambda: _ops.rotary_embedding(pos, q, k, cos[:, :3], sin), "cos must have head_dim / 2 = 4 columns")
    _bad(lambda: _ops.rotary_embedding(pos, q, k, cos, sin[:8]), "sin has 8 positions but cos has 16")
    _bad(lambda: _ops.rotary_embedding(pos, q.transpose(1, 2), k, cos, sin), "query must have dense")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    # Schemas (mutated arguments declared), fake kernels and the dispatcher agree with the kernels.
    x, w = randn(5, 64, dtype=torch.float32, device=device), randn(64, dtype=torch.float32, device=device, seed=1)
    torch.library.opcheck(torch.ops.pyserve.rms_norm.default, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.pyserve.fused_add_rms_norm.default, (x.clone(), x.clone() * 2, w, 1e-5))
    torch.library.opcheck(torch.ops.pyserve.silu_and_mul.default, (x,))
    cos, sin = tables(32, 16, torch.float32, device)
    q, k = randn(5, 4, 16, dtype=torch.float32, device=device), randn(5, 2, 16, dtype=torch.float32, device=device)
    positions = torch.tensor([0, 3, 31, 7, 7], device=device)
    torch.library.opcheck(torch.ops.pyserve.rotary_embedding.default, (positions, q, k, cos, sin))
