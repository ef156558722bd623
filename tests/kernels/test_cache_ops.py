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
    torch.library.opcheck(torch.ops.pyserve.copy_blocks.default,
                          (key_cache, value_cache, torch.tensor([[0, 2], [1, 3]])))
    torch.library.opcheck(torch.ops.pyserve.compute_slot_mapping.default,
                          (torch.tensor([[2, 0], [1, 3]], dtype=torch.int32), torch.tensor([9, 3], dtype=torch.int32),
                           torch.tensor([0, 2, 5], dtype=torch.int32), 8, 6))
