"""paged_attention against a plain PyTorch causal attention over gathered K/V."""

import pytest
import torch

from pyserve import _ops
from tests.conftest import DEVICES
from tests.kernels.attention_reference import make_paged_batch, reference_attention

# Per storage dtype: (atol, rtol) of the kernel output vs the fp32 reference.
TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

# A decode, a long prefill split into chunks (the second chunk sits on the
# first's cache), a prefill on top of a cached prefix, a fresh prefill, and a
# decode at a block boundary.
MIXED = [(40, 1), (0, 75), (75, 60), (33, 17), (0, 5), (31, 1)]


def run(batch, device):
    b = batch.to(device)
    out = _ops.paged_attention(b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens,
                               b.query_start_loc, b.scale, b.max_seq_len)
    return out, reference_attention(b)


def assert_close(out, ref, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_mixed_batch(device, dtype, head_dim, block_size, num_heads, num_kv_heads):
    batch = make_paged_batch(MIXED, num_heads, num_kv_heads, head_dim, block_size, dtype, padding_rows=3)
    out, ref = run(batch, device)
    assert out.shape == batch.query.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    assert (out[-3:] == 0).all(), "padding rows must come back as zeros"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_context(device, dtype):
    # 8192 cached tokens: on CUDA this spans many split-K partitions.
    batch = make_paged_batch([(8191, 1), (8000, 192), (100, 1)], 8, 2, 128, 16, dtype)
    out, ref = run(batch, device)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_only_default_model_shape(device):
    # The default model's attention: 9 query heads over 3 KV heads, head_dim 64.
    seqs = [(int(n), 1) for n in torch.randint(1, 300, (16,))]
    batch = make_paged_batch(seqs, 9, 3, 64, 16, torch.float32)
    out, ref = run(batch, device)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_query(device):
    # The model passes q as a view into a fused QKV projection.
    batch = make_paged_batch(MIXED, 4, 2, 64, 16, torch.float32)
    fused = torch.randn(batch.query.shape[0], 8 * 64)
    fused[:, : 4 * 64] = batch.query.reshape(batch.query.shape[0], -1)
    batch.query = fused[:, : 4 * 64].view(-1, 4, 64)
    assert not batch.query.is_contiguous()
    out, ref = run(batch, device)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    batch = make_paged_batch([], 4, 4, 64, 16, torch.float32, padding_rows=2)
    out, _ = run(batch, device)
    assert out.shape == (2, 4, 64) and (out == 0).all()


def test_opcheck():
    b = make_paged_batch(MIXED, 9, 3, 64, 16, torch.float32, padding_rows=1)
    torch.library.opcheck(
        torch.ops.pyserve.paged_attention.default,
        (b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.scale, b.max_seq_len),
    )


def _args(b):
    return dict(query=b.query, key_cache=b.key_cache, value_cache=b.value_cache, block_tables=b.block_tables,
                seq_lens=b.seq_lens, query_start_loc=b.query_start_loc, scale=b.scale, max_seq_len=b.max_seq_len)


@pytest.mark.parametrize(
    "name,bad,message",
    [
        ("query", lambda a: a["query"].double(), "query dtype"),
        ("query", lambda a: a["query"][:, :, :48], "head_dim"),
        ("query", lambda a: a["query"][:, :5], "not a multiple"),
        ("key_cache", lambda a: a["key_cache"].half(), "value_cache dtype"),
        ("value_cache", lambda a: a["value_cache"][:, :8], "value_cache shape"),
        ("key_cache", lambda a: a["key_cache"].transpose(0, 1).contiguous().transpose(0, 1), "key_cache must be contiguous"),
        ("block_tables", lambda a: a["block_tables"].long(), "block_tables must be Int"),
        ("seq_lens", lambda a: a["seq_lens"][:-1], "block_tables has"),
        ("query_start_loc", lambda a: a["query_start_loc"][:-1], "query_start_loc must have"),
        ("seq_lens", lambda a: a["seq_lens"] * 0, r"seq_lens\[0\] = 0"),
        ("seq_lens", lambda a: a["seq_lens"] + 1000, "capacity"),
        ("block_tables", lambda a: a["block_tables"] * 0 + 10_000, r"block_tables\[\d+\]\[0\] = 10000"),
        ("query_start_loc", lambda a: a["query_start_loc"].flip(0), "query_start_loc"),
    ],
)
def test_bad_arguments_raise(name, bad, message):
    b = make_paged_batch(MIXED, 9, 3, 64, 16, torch.float32)
    args = _args(b)
    args[name] = bad(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyserve.paged_attention(*args.values())
