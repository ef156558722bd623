"""reshape_and_cache, compute_slot_mapping and copy_blocks against plain PyTorch."""

import pytest
import torch

from pyserve import _ops
from tests.conftest import DEVICES
from tests.kernels.attention_reference import reference_slot_mapping

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape).to(dtype).to(device), torch.randn(shape).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_reshape_and_cache(device, dtype, block_size, head_dim):
    num_blocks, num_kv_heads, num_tokens = 20, 3, 50
    key_cache, value_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    key = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype).to(device)
    value = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[::7] = -1  # padding rows are skipped
    slot_mapping = slots.to(device)
    expect_k, expect_v = key_cache.clone(), value_cache.clone()
    flat_k = expect_k.view(-1, num_kv_heads, head_dim)
    flat_v = expect_v.view(-1, num_kv_heads, head_dim)
    keep = slots >= 0
    flat_k[slots[keep].to(device)] = key[keep.to(device)]
    flat_v[slots[keep].to(device)] = value[keep.to(device)]

    _ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    torch.testing.assert_close(key_cache, expect_k, atol=0, rtol=0)
    torch.testing.assert_close(value_cache, expect_v, atol=0, rtol=0)


def rounding_cases(n: int) -> torch.Tensor:
    """n fp32 values that exercise a narrowing conversion: ties (low 16 bits 0x8000 with even and odd
    bf16 mantissas), values just off a tie, fp16 subnormals and overflow, +-inf, NaN, -0."""
    bits = torch.randint(0, 2**31 - 1, (n,), dtype=torch.int64)
    bits[0::4] = (bits[0::4] & ~0xFFFF) | 0x8000  # exact bf16 ties: round to even
    bits[1::4] = (bits[1::4] & ~0xFFFF) | 0x8001  # just above a tie
    x = (bits.to(torch.int32)).view(torch.float32).clone()
    x[2::8] = torch.randn(x[2::8].shape) * 1e-6  # fp16 subnormals
    x[3::16] = 7e4  # fp16 overflow -> inf
    x[5] = float("inf")
    x[6] = float("-inf")
    x[7] = float("nan")
    x[9] = -0.0
    x[11::3] *= -1
    return x


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_reshape_and_cache_fp32_into_low_precision_cache(cache_dtype, block_size, head_dim):
    # --kv-cache-dtype: fp32 K/V written into a bf16/fp16 cache round as torch's .to(cache_dtype).
    num_blocks, num_kv_heads, num_tokens = 20, 3, 50
    key_cache, value_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, cache_dtype, "cpu")
    key = rounding_cases(num_tokens * num_kv_heads * head_dim).view(num_tokens, num_kv_heads, head_dim)
    value = torch.randn(num_tokens, num_kv_heads, head_dim) * 100
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[::7] = -1  # padding rows are skipped
    expect_k, expect_v = key_cache.clone(), value_cache.clone()
    keep = slots >= 0
    expect_k.view(-1, num_kv_heads, head_dim)[slots[keep]] = key[keep].to(cache_dtype)
    expect_v.view(-1, num_kv_heads, head_dim)[slots[keep]] = value[keep].to(cache_dtype)

    _ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    # Bitwise: the same rounding, not merely close. NaNs only as NaNs: torch's own scalar and
    # vectorized conversions disagree on the payload (0x7FC0 against 0xFFFF).
    nan = expect_k.isnan()
    assert torch.equal(key_cache.isnan(), nan) and bool(nan.any())
    assert torch.equal(key_cache.view(torch.int16)[~nan], expect_k.view(torch.int16)[~nan])
    assert torch.equal(value_cache.view(torch.int16), expect_v.view(torch.int16))


def test_reshape_and_cache_strided_fp32_rows_into_bf16_cache():
    key_cache, value_cache = make_cache(4, 16, 2, 64, torch.bfloat16, "cpu")
    fused = torch.randn(10, 3 * 2 * 64)
    key, value = fused[:, 128:256].view(10, 2, 64), fused[:, 256:].view(10, 2, 64)
    slot_mapping = torch.arange(10) * 3
    _ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    assert torch.equal(key_cache.view(-1, 2, 64)[slot_mapping], key.to(torch.bfloat16))
    assert torch.equal(value_cache.view(-1, 2, 64)[slot_mapping], value.to(torch.bfloat16))


@pytest.mark.parametrize("key_dtype,cache_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_reshape_and_cache_unsupported_dtype_pairs_name_the_arguments(key_dtype, cache_dtype):
    key_cache, value_cache = make_cache(2, 8, 1, 64, cache_dtype, "cpu")
    key = torch.randn(2, 1, 64).to(key_dtype)
    with pytest.raises(RuntimeError, match=r"key_cache dtype .* differs from key dtype .*needs key in float32"):
        torch.ops.pyserve.reshape_and_cache(key, key, key_cache, value_cache, torch.tensor([0, 1]))


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_strided_rows(device):
    # K and V as views into one fused projection output.
    key_cache, value_cache = make_cache(4, 16, 2, 64, torch.float32, device)
    fused = torch.randn(10, 3 * 2 * 64, device=device)
    key = fused[:, 128:256].view(10, 2, 64)
    value = fused[:, 256:].view(10, 2, 64)
    slot_mapping = torch.arange(10, device=device) * 3
    _ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    torch.testing.assert_close(key_cache.view(-1, 2, 64)[slot_mapping], key, atol=0, rtol=0)
    torch.testing.assert_close(value_cache.view(-1, 2, 64)[slot_mapping], value, atol=0, rtol=0)


def test_reshape_and_cache_slot_out_of_range():
    key_cache, value_cache = make_cache(2, 8, 1, 64, torch.float32, "cpu")
    key = torch.randn(2, 1, 64)
    with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] = 16"):
        _ops.reshape_and_cache(key, key, key_cache, value_cache, torch.tensor([0, 16]))


@pytest.mark.parametrize("name,bad,message", [
    ("key", lambda a: a["key"].half(), "key dtype"),
    ("value", lambda a: a["value"][:, :, :32], "value shape"),
    ("key_cache", lambda a: a["key_cache"][..., :32].contiguous(), "key_cache shape|key has"),
    ("slot_mapping", lambda a: a["slot_mapping"].int(), "slot_mapping must be Long"),
    ("slot_mapping", lambda a: a["slot_mapping"][:1], "slot_mapping has 1 entries"),
])
def test_reshape_and_cache_bad_arguments(name, bad, message):
    key_cache, value_cache = make_cache(2, 8, 1, 64, torch.float32, "cpu")
    args = dict(key=torch.randn(2, 1, 64), value=torch.randn(2, 1, 64), key_cache=key_cache,
                value_cache=value_cache, slot_mapping=torch.tensor([0, 1]))
    args[name] = bad(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyserve.reshape_and_cache(*args.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_compute_slot_mapping(device, block_size):
    # decode, chunked prefill on a cached prefix, fresh prefill, empty sequence; 4 padding rows
    seqs = [(40, 1), (75, 60), (0, 17), (5, 0)]
    lens = [c + n for c, n in seqs]
    max_blocks = max(-(-n // block_size) for n in lens)
    block_tables = torch.randperm(100)[: len(seqs) * max_blocks].view(len(seqs), max_blocks).int()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.tensor([0, 1, 61, 78, 78], dtype=torch.int32)
    num_tokens = 82
    slots, positions = _ops.compute_slot_mapping(block_tables.to(device), seq_lens.to(device), qsl.to(device),
                                                 block_size, num_tokens)
    ref_slots, ref_positions = reference_slot_mapping(block_tables, seq_lens, qsl, block_size, num_tokens)
    assert torch.equal(slots.cpu(), ref_slots)
    assert torch.equal(positions.cpu(), ref_positions)


def test_compute_slot_mapping_rejects_short_table():
    with pytest.raises(RuntimeError, match="capacity"):
        _ops.compute_slot_mapping(torch.zeros(1, 1, dtype=torch.int32), torch.tensor([17], dtype=torch.int32),
                                  torch.tensor([0, 1], dtype=torch.int32), 16, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks(device, dtype):
    key_cache, value_cache = make_cache(12, 16, 3, 64, dtype, device)
    pairs = torch.tensor([[0, 5], [3, 7], [3, 8], [11, 1]], dtype=torch.int64)
    expect_k, expect_v = key_cache.clone(), value_cache.clone()
    for src, dst in pairs.tolist():
        expect_k[dst] = expect_k[src]
        expect_v[dst] = expect_v[src]
    _ops.copy_blocks(key_cache, value_cache, pairs.to(device))
    assert torch.equal(key_cache, expect_k) and torch.equal(value_cache, expect_v)


def test_copy_blocks_bad_id():
    key_cache, value_cache = make_cache(4, 8, 1, 64, torch.float32, "cpu")
    before = key_cache.clone()
    with pytest.raises(RuntimeError, match=r"block_mapping\[1\]\[1\] = 4"):
        _ops.copy_blocks(key_cache, value_cache, torch.tensor([[0, 1], [2, 4]]))
    assert torch.equal(key_cache, before), "a rejected mapping must not copy anything"


def test_opcheck_cache_ops():
    key_cache, value_cache = make_cache(6, 8, 2, 64, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.pyserve.reshape_and_cache.default,
                          (torch.randn(5, 2, 64), torch.randn(5, 2, 64), key_cache, value_cache,
                           torch.tensor([0, 3, -1, 9, 20])))
    low_k, low_v = make_cache(6, 8, 2, 64, torch.bfloat16, "cpu")
    torch.library.opcheck(torch.ops.pyserve.reshape_and_cache.default,
                          (torch.randn(5, 2, 64), torch.randn(5, 2, 64), low_k, low_v, torch.tensor([0, 3, -1, 9, 20])))
    torch.library.opcheck(torch.ops.pyserve.copy_blocks.default,
                          (key_cache, value_cache, torch.tensor([[0, 2], [1, 3]])))
    torch.library.opcheck(torch.ops.pyserve.copy_blocks.default, (low_k, low_v, torch.tensor([[0, 2], [1, 3]])))
    torch.library.opcheck(torch.ops.pyserve.compute_slot_mapping.default,
                          (torch.tensor([[2, 0], [1, 3]], dtype=torch.int32), torch.tensor([9, 3], dtype=torch.int32),
                           torch.tensor([0, 2, 5], dtype=torch.int32), 8, 6))
