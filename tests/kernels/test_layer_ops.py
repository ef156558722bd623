"""rms_norm, rms_norm_inplace, fused_add_rms_norm, silu_and_mul,
gelu_tanh_and_mul and rotary_embedding against Hugging Face's own PyTorch
formulation of each (Llama's, and Gemma's for the (1 + weight) norm; same
dtype, same rounding points), on every device."""

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


def reference_gemma_rms_norm(x, weight, eps):  # transformers' Gemma3RMSNorm.forward (Gemma, Gemma 2 alike)
    out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).type_as(x)


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


# ----------------------------------------------------------------------------- Gemma's (1 + weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(0, 64), (1, 576), (37, 576), (300, 96), (3, 2304)])
def test_rms_norm_gemma_weight(device, dtype, rows, hidden):
    x = randn(rows, hidden, dtype=dtype, device=device) * 3
    w = randn(hidden, dtype=dtype, device=device, seed=1) * 0.3  # Gemma stores 1 + w as w ~ 0
    assert_close(_ops.rms_norm(x, w, 1e-6, weight_offset=1.0), reference_gemma_rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(0, 64), (1, 576), (33, 576), (130, 96)])
def test_fused_add_rms_norm_gemma_weight(device, dtype, rows, hidden):
    x = randn(rows, hidden, dtype=dtype, device=device)
    residual = randn(rows, hidden, dtype=dtype, device=device, seed=2) * 4
    w = randn(hidden, dtype=dtype, device=device, seed=1) * 0.3
    want_residual = x + residual  # Gemma 2/3 add in the storage dtype too
    want = reference_gemma_rms_norm(want_residual, w, 1e-6)
    _ops.fused_add_rms_norm(x, residual, w, 1e-6, 1.0)
    torch.testing.assert_close(residual, want_residual, atol=0, rtol=0)
    assert_close(x, want)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_offset_is_added_to_the_weight(device):
    # Any offset: (offset + w) * normalized x; offset 0 is the default.
    x = randn(7, 96, dtype=torch.float32, device=device)
    w = randn(96, dtype=torch.float32, device=device, seed=1)
    assert torch.equal(_ops.rms_norm(x, w, 1e-6, 0.0), _ops.rms_norm(x, w, 1e-6))
    assert_close(_ops.rms_norm(x, w, 1e-6, 2.5), reference_rms_norm(x, w + 2.5, 1e-6))


# ----------------------------------------------------------------------------- in-place per-head norms


def fused_qkv(tokens, heads, kv_heads, head_dim, dtype, device):
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device, seed=3) * 2
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :]
    return qkv, q, k, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 8, 128), (8, 4, 256), (9, 3, 64), (4, 1, 80)])
@pytest.mark.parametrize("model", ["qwen3", "gemma3"])
def test_per_head_qk_norm_in_a_fused_qkv_projection(device, dtype, heads, kv_heads, head_dim, model):
    # Qwen3 and Gemma 3 normalize every head of q and k (one weight of head_dim
    # each for q and k), where q and k are strided views into the QKV output.
    tokens = 21
    qkv, q, k, v = fused_qkv(tokens, heads, kv_heads, head_dim, dtype, device)
    assert not q.is_contiguous() and not k.is_contiguous()
    q_w = randn(head_dim, dtype=dtype, device=device, seed=4) * (0.3 if model == "gemma3" else 1)
    k_w = randn(head_dim, dtype=dtype, device=device, seed=5) * (0.3 if model == "gemma3" else 1)
    reference, offset = (reference_gemma_rms_norm, 1.0) if model == "gemma3" else (reference_rms_norm, 0.0)
    want_q, want_k, v_before = reference(q, q_w, 1e-6), reference(k, k_w, 1e-6), v.clone()
    ptr = qkv.data_ptr()
    _ops.rms_norm_inplace(q, q_w, 1e-6, offset)
    _ops.rms_norm_inplace(k, k_w, 1e-6, offset)
    assert qkv.data_ptr() == ptr
    assert_close(q, want_q)
    assert_close(k, want_k)
    assert torch.equal(v, v_before), "the norm wrote into v"


def test_per_head_norm_matches_transformers_modules():
    # The same check against the modules themselves, in bf16.
    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    qkv, q, k, _ = fused_qkv(9, 8, 2, 128, torch.bfloat16, "cpu")
    for module, offset in [(qwen3.Qwen3RMSNorm(128, eps=1e-6), 0.0), (gemma3.Gemma3RMSNorm(128, eps=1e-6), 1.0)]:
        module = module.to(torch.bfloat16)
        with torch.no_grad():
            module.weight.copy_(randn(128, dtype=torch.bfloat16, device="cpu", seed=6) * 0.5)
            want = module(q.clone())
        got = q.clone()
        _ops.rms_norm_inplace(got, module.weight.detach(), 1e-6, offset)
        assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(0, 64), (5, 64), (37, 576), (3, 4096)])
def test_rms_norm_inplace_2d(device, dtype, rows, hidden):
    x = randn(rows, hidden, dtype=dtype, device=device) * 3
    w = randn(hidden, dtype=dtype, device=device, seed=1)
    want = reference_rms_norm(x, w, 1e-5)
    _ops.rms_norm_inplace(x, w, 1e-5)
    assert_close(x, want)
    # Strided rows, and the neighbours of each row stay as they were.
    buf = randn(rows, hidden + 24, dtype=dtype, device=device, seed=2)
    before = buf.clone()
    view = buf[:, 8 : 8 + hidden]
    want = reference_gemma_rms_norm(view, w, 1e-5)
    _ops.rms_norm_inplace(view, w, 1e-5, 1.0)
    assert_close(view, want)
    assert torch.equal(buf[:, :8], before[:, :8]) and torch.equal(buf[:, 8 + hidden :], before[:, 8 + hidden :])


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_inplace_head_major_view(device):
    # Rows need not be in token-major order: [tokens, heads, D] over a [heads, tokens, D] buffer.
    buf = randn(4, 6, 64, dtype=torch.float32, device=device)
    x = buf.transpose(0, 1)
    w = randn(64, dtype=torch.float32, device=device, seed=1)
    want = reference_rms_norm(x, w, 1e-6)
    _ops.rms_norm_inplace(x, w, 1e-6)
    assert_close(x, want)


# ----------------------------------------------------------------------------- gelu_tanh_and_mul


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(0, 8), (1, 1536), (7, 13), (64, 1536), (300, 40), (2, 9216)])
def test_gelu_tanh_and_mul(device, dtype, rows, d):
    x = randn(rows, 2 * d, dtype=dtype, device=device) * 4
    gate, up = x.chunk(2, dim=-1)
    assert_close(_ops.gelu_tanh_and_mul(x), F.gelu(gate, approximate="tanh") * up)


@pytest.mark.parametrize("device", DEVICES)
def test_gelu_tanh_and_mul_saturates_cleanly(device):
    gate = torch.tensor([-200.0, -90.0, -12.0, -5.0, -1e-3, 0.0, 1e-3, 0.5, 5.0, 12.0, 90.0, 200.0, -0.3, 0.3, 2.0, -2.0])
    x = torch.cat([gate, torch.linspace(-3, 3, 16)])[None].to(device)
    out = _ops.gelu_tanh_and_mul(x)
    g, up = x.chunk(2, dim=-1)
    assert torch.isfinite(out).all()
    assert_close(out, F.gelu(g, approximate="tanh") * up)


@pytest.mark.parametrize("device", DEVICES)
def test_gelu_tanh_and_mul_of_strided_rows(device):
    x = randn(9, 100, dtype=torch.float32, device=device)[:, :64]
    gate, up = x.chunk(2, dim=-1)
    assert_close(_ops.gelu_tanh_and_mul(x), F.gelu(gate, approximate="tanh") * up)


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
    _bad(lambda: _ops.gelu_tanh_and_mul(torch.randn(4, 7)), "input's last dimension must be even")
    _bad(lambda: _ops.gelu_tanh_and_mul(torch.randn(4, 8).long()), "input must be float32, float16 or bfloat16")
    _bad(lambda: _ops.gelu_tanh_and_mul(torch.randn(8, 4).t()), "input must have dense rows")
    _bad(lambda: _ops.gelu_tanh_and_mul(torch.randn(2, 4, 8)), "input must be 2-D")
    _bad(lambda: _ops.rms_norm(x, w, 1e-5, float("nan")), "weight_offset must be finite")
    _bad(lambda: _ops.fused_add_rms_norm(x, x.clone(), w, 1e-5, float("inf")), "weight_offset must be finite")
    heads = torch.randn(3, 4, 64)
    _bad(lambda: _ops.rms_norm_inplace(heads, torch.randn(32), 1e-5), "weight has 32 entries but input rows have 64")
    _bad(lambda: _ops.rms_norm_inplace(heads, w.half(), 1e-5), "weight dtype")
    _bad(lambda: _ops.rms_norm_inplace(heads.transpose(1, 2), torch.randn(4), 1e-5),
         r"input must have a contiguous last dimension")
    _bad(lambda: _ops.rms_norm_inplace(heads.view(3, 2, 2, 64), w, 1e-5), "input must be 2-D .* or 3-D")
    _bad(lambda: _ops.rms_norm_inplace(heads.long(), w, 1e-5), "input must be float32, float16 or bfloat16")
    _bad(lambda: _ops.rms_norm_inplace(heads, w, float("nan")), "eps must be finite and >= 0")
    _bad(lambda: _ops.rms_norm_inplace(heads, w, 1e-5, float("nan")), "weight_offset must be finite")
    overlapping = torch.randn(400).as_strided((3, 4, 64), (64, 32, 1))  # heads overlap by half
    _bad(lambda: _ops.rms_norm_inplace(overlapping, w, 1e-5), "input rows overlap in memory")
    _bad(lambda: _ops.rms_norm_inplace(torch.randn(64).expand(5, 64), w, 1e-5), "input rows overlap in memory")
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
    torch.library.opcheck(torch.ops.pyserve.gelu_tanh_and_mul.default, (x,))
    torch.library.opcheck(torch.ops.pyserve.rms_norm.default, (x, w, 1e-5, 1.0))
    torch.library.opcheck(torch.ops.pyserve.fused_add_rms_norm.default, (x.clone(), x.clone() * 2, w, 1e-5, 1.0))
    torch.library.opcheck(torch.ops.pyserve.rms_norm_inplace.default, (x.clone(), w, 1e-5, 1.0))
    qkv = randn(5, 4 * 16, dtype=torch.float32, device=device)
    heads_w = randn(16, dtype=torch.float32, device=device, seed=2)
    torch.library.opcheck(torch.ops.pyserve.rms_norm_inplace.default, (qkv[:, 16:48].view(5, 2, 16), heads_w, 1e-6))
    cos, sin = tables(32, 16, torch.float32, device)
    q, k = randn(5, 4, 16, dtype=torch.float32, device=device), randn(5, 2, 16, dtype=torch.float32, device=device)
    positions = torch.tensor([0, 3, 31, 7, 7], device=device)
    torch.library.opcheck(torch.ops.pyserve.rotary_embedding.default, (positions, q, k, cos, sin))
