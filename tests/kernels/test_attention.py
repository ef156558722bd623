"""paged_attention against a plain PyTorch causal attention over gathered K/V,
with and without a sliding window and a logit soft-cap."""

import pytest
import torch

from pyserve import _ops
from tests.conftest import DEVICES
from tests.kernels.attention_reference import make_paged_batch, reference_attention, visible_keys

# Per storage dtype: (atol, rtol) of the kernel output vs the fp32 reference.
TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

# A decode, a long prefill split into chunks (the second chunk sits on the
# first's cache), a prefill on top of a cached prefix, a fresh prefill, and a
# decode at a block boundary.
MIXED = [(40, 1), (0, 75), (75, 60), (33, 17), (0, 5), (31, 1)]


def run(batch, device, sliding_window=None, logits_soft_cap=None):
    b = batch.to(device)
    out = _ops.paged_attention(b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens,
                               b.query_start_loc, b.scale, b.max_seq_len, sliding_window, logits_soft_cap)
    return out, reference_attention(b, sliding_window, logits_soft_cap)


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


# ----------------------------------------------------------------------------- cache dtype != query dtype
# --kv-cache-dtype on the CPU: an fp32 model reading a bf16 or fp16 cache. The reference sees the
# cache's values widened exactly to fp32, so the kernel (fp32 math on the same values) must meet the
# fp32 tolerance; only the storage rounding differs from an fp32 cache, and that is the cache's own.


def with_cache_dtype(batch, cache_dtype):
    """The batch with its caches (and the reference's gathered K/V) stored in cache_dtype."""
    batch.key_cache = batch.key_cache.to(cache_dtype)
    batch.value_cache = batch.value_cache.to(cache_dtype)
    batch.keys = [k.to(cache_dtype) for k in batch.keys]
    batch.values = [v.to(cache_dtype) for v in batch.values]
    return batch


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_fp32_query_low_precision_cache(cache_dtype, head_dim, block_size, num_heads, num_kv_heads):
    batch = make_paged_batch(MIXED, num_heads, num_kv_heads, head_dim, block_size, torch.float32, padding_rows=3)
    fp32_cache = run(batch, "cpu")[0]
    out, ref = run(with_cache_dtype(batch, cache_dtype), "cpu")
    assert out.dtype == torch.float32 and out.shape == batch.query.shape
    assert_close(out, ref, torch.float32)
    assert (out[-3:] == 0).all(), "padding rows must come back as zeros"
    assert not torch.equal(out, fp32_cache), "the cache's rounding should show: was it read as fp32?"


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,cap", [(13, None), (None, 20.0), (70, 3.0)])
def test_fp32_query_low_precision_cache_window_and_soft_cap(cache_dtype, window, cap):
    batch = with_cache_dtype(_sharpened(make_paged_batch(MIXED, 9, 3, 64, 16, torch.float32), 4.0), cache_dtype)
    out, ref = run(batch, "cpu", sliding_window=window, logits_soft_cap=cap)
    assert_close(out, ref, torch.float32)


def test_fp32_query_bf16_cache_decode_default_model_shape():
    # The engine's hot path: 16 decodes of the default model's geometry, some past 256 keys.
    seqs = [(int(n), 1) for n in torch.randint(1, 600, (16,))]
    out, ref = run(with_cache_dtype(make_paged_batch(seqs, 9, 3, 64, 16, torch.float32), torch.bfloat16), "cpu")
    assert_close(out, ref, torch.float32)


def test_opcheck_low_precision_cache():
    b = with_cache_dtype(make_paged_batch(MIXED, 9, 3, 64, 16, torch.float32, padding_rows=1), torch.bfloat16)
    torch.library.opcheck(torch.ops.pyserve.paged_attention.default, tuple(_args(b).values()))


@pytest.mark.parametrize("query_dtype,cache_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_unsupported_cache_dtype_pairs_name_the_arguments(query_dtype, cache_dtype):
    b = with_cache_dtype(make_paged_batch(MIXED, 9, 3, 64, 16, torch.float32), cache_dtype)
    b.query = b.query.to(query_dtype)
    with pytest.raises(RuntimeError, match=r"key_cache dtype .* differs from query dtype .*needs query in float32"):
        torch.ops.pyserve.paged_attention(*_args(b).values())


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


# ----------------------------------------------------------------------------- sliding window, soft-cap


@pytest.mark.parametrize("window", [1, 2, 5, 16, 100])
def test_window_mask_is_transformers_sliding_window_causal_mask(window):
    # The reference's mask against transformers' own mask function (what
    # Mistral, Qwen2, Gemma 2 and Gemma 3 use for their sliding layers).
    masking_utils = pytest.importorskip("transformers.masking_utils")
    mask_fn = masking_utils.sliding_window_causal_mask_function(window)
    q_idx = torch.arange(0, 130)[:, None]
    kv_idx = torch.arange(0, 130)[None, :]
    theirs = mask_fn(0, 0, q_idx, kv_idx)
    assert torch.equal(visible_keys(torch.arange(130), 130, window), theirs)
    assert int(theirs[129].sum()) == min(window, 130)  # the window counts the query's own key


# Windows shorter than every sequence, cutting inside blocks of 8/16/32 (5,
# 13, 37), on a block boundary (16, 32), and longer than every sequence (500).
WINDOWS = [1, 5, 13, 16, 32, 37, 70, 500]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_sliding_window_mixed_batch(device, window, head_dim, block_size, num_heads, num_kv_heads):
    batch = make_paged_batch(MIXED, num_heads, num_kv_heads, head_dim, block_size, torch.float32, padding_rows=2)
    out, ref = run(batch, device, sliding_window=window)
    assert_close(out, ref, torch.float32)
    assert (out[-2:] == 0).all(), "padding rows must come back as zeros"
    if window >= batch.max_seq_len:
        plain, _ = run(batch, device)
        assert torch.equal(out, plain), "a window longer than every sequence must change nothing"
    else:
        _, causal = run(batch, device)
        assert not torch.allclose(ref, causal), "the window should matter for this batch"


def _sharpened(batch, factor):
    # Scores of ~N(0, factor^2): large enough for a soft-cap to bite.
    batch.query = (batch.query.float() * factor).to(batch.query.dtype)
    return batch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cap", [1.0, 5.0, 30.0, 50.0])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_soft_cap_mixed_batch(device, cap, head_dim, block_size, num_heads, num_kv_heads):
    batch = _sharpened(make_paged_batch(MIXED, num_heads, num_kv_heads, head_dim, block_size, torch.float32), 12.0)
    out, ref = run(batch, device, logits_soft_cap=cap)
    assert_close(out, ref, torch.float32)
    _, uncapped = run(batch, device)
    assert (ref - uncapped).abs().max() > 1e-2, "the cap should matter for these scores"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 256])
@pytest.mark.parametrize("window,cap", [(5, None), (37, None), (None, 20.0), (13, 50.0), (70, 3.0)])
def test_window_and_soft_cap_dtypes(device, dtype, head_dim, window, cap):
    batch = _sharpened(make_paged_batch(MIXED, 9, 3, head_dim, 16, dtype, padding_rows=1), 4.0)
    out, ref = run(batch, device, sliding_window=window, logits_soft_cap=cap)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,cap", [(4096, None), (1000, None), (777, 30.0), (None, 50.0)])
def test_long_context_window_and_soft_cap(device, window, cap):
    # On CUDA the window's keys are split over several partitions (1000 and 777
    # are not multiples of the partition or tile size); on the CPU a decode
    # starts inside a block far from the first.
    batch = make_paged_batch([(8191, 1), (8000, 192), (100, 1), (5000, 33)], 8, 2, 128, 16, torch.float32)
    out, ref = run(batch, device, sliding_window=window, logits_soft_cap=cap)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("off", [dict(sliding_window=0), dict(sliding_window=-3), dict(logits_soft_cap=0.0),
                                 dict(logits_soft_cap=-1.0), dict(sliding_window=None, logits_soft_cap=None)])
def test_window_and_soft_cap_off_values(device, off):
    b = make_paged_batch(MIXED, 9, 3, 64, 16, torch.float32, padding_rows=1).to(device)
    args = (b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.scale, b.max_seq_len)
    assert torch.equal(_ops.paged_attention(*args, **off), _ops.paged_attention(*args))


@pytest.mark.parametrize("device", DEVICES)
def test_window_of_one_is_the_own_value(device):
    # W = 1: each query sees only its own key, so the output is its V row.
    seqs = [(10, 3), (0, 4), (40, 1)]
    batch = make_paged_batch(seqs, 6, 2, 64, 8, torch.float32)
    out, _ = run(batch, device, sliding_window=1)
    rows = []
    for (cached, new), values in zip(seqs, batch.values):
        rows.append(values[cached:cached + new].repeat_interleave(3, dim=1))
    torch.testing.assert_close(out.cpu(), torch.cat(rows), atol=1e-6, rtol=1e-6)


def test_opcheck():
    b = make_paged_batch(MIXED, 9, 3, 64, 16, torch.float32, padding_rows=1)
    torch.library.opcheck(
        torch.ops.pyserve.paged_attention.default,
        (b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.scale, b.max_seq_len),
    )
    torch.library.opcheck(
        torch.ops.pyserve.paged_attention.default,
        (b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.scale, b.max_seq_len,
         13, 20.0),
    )


def _args(b):
    return dict(query=b.query, key_cache=b.key_cache, value_cache=b.value_cache, block_tables=b.block_tables,
                seq_lens=b.seq_lens, query_start_loc=b.query_start_loc, scale=b.scale, max_seq_len=b.max_seq_len)


@pytest.mark.parametrize(
    "name,bad,message",
    [
        ("query", lambda a: a["query"].double(), "query must be float32"),
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


@pytest.mark.parametrize(
    "cap,message",
    [
        (float("nan"), "logits_soft_cap must be finite"),
        (float("inf"), "logits_soft_cap must be finite"),
        (float("-inf"), "logits_soft_cap must be finite"),
        (1e-45, "logits_soft_cap must be between 1e-38 and 3e38 in float32"),  # 1 / cap overflows float32
        (1e39, "logits_soft_cap must be between 1e-38 and 3e38 in float32"),  # cap overflows float32
    ],
)
def test_bad_soft_cap_raises(cap, message):
    b = make_paged_batch(MIXED, 9, 3, 64, 16, torch.float32)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyserve.paged_attention(*_args(b).values(), None, cap)


def test_window_and_soft_cap_types_are_checked_by_the_schema():
    b = make_paged_batch(MIXED, 9, 3, 64, 16, torch.float32)
    with pytest.raises(RuntimeError, match="sliding_window"):
        torch.ops.pyserve.paged_attention(*_args(b).values(), 4.5, None)
    with pytest.raises(RuntimeError, match="logits_soft_cap"):
        torch.ops.pyserve.paged_attention(*_args(b).values(), None, "50")
