"""Dequantization against gguf-py's `gguf.quants.dequantize`: synthetic blocks and the real file."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from pyserve.loader.gguf_dequant import KERNELS, dequantize
from pyserve.loader.gguf_reader import read_gguf
from pyserve.loader.gguf_types import BLOCK_LAYOUT, GGMLType, GGUFError
from pyserve.loader.gguf_weights import load_tensors

gguf = pytest.importorskip("gguf")

SUPPORTED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of the fp16 scales in each block: random bits there could be NaN/inf.
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _random_blocks(name: str, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw bytes in the block layout of `name`: valid for every format once the fp16
    scales are replaced with finite values."""
    block, size = BLOCK_LAYOUT[GGMLType[name]]
    raw = rng.integers(0, 256, (rows, blocks_per_row, size), dtype=np.uint8)
    for off in F16_FIELDS.get(name, []):
        scale = (rng.standard_normal((rows, blocks_per_row)) * 0.1).astype(np.float16)
        raw[:, :, off : off + 2] = scale.view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, blocks_per_row * size)


def _assert_same(ours: np.ndarray, ref: np.ndarray) -> None:
    ref = np.asarray(ref, dtype=np.float32)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)  # bit-exact (NaN == NaN for F16/BF16 raw bits)


def test_every_supported_type_has_a_kernel():
    assert sorted(GGMLType(t).name for t in KERNELS) == sorted(SUPPORTED)


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("rows,blocks_per_row", [(1, 1), (5, 3), (64, 8)])
def test_random_blocks_match_gguf_py(name, rows, blocks_per_row):
    rng = np.random.default_rng(zlib.crc32(f"{name}/{rows}".encode()))  # stable across runs
    raw = _random_blocks(name, rows, blocks_per_row, rng)
    qtype = gguf.GGMLQuantizationType[name]
    _assert_same(dequantize(raw, int(qtype), name), gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("name", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_floats_match_gguf_py(name):
    # The types gguf-py can quantize: real-looking data, including all-zero blocks.
    qtype = gguf.GGMLQuantizationType[name]
    x = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    x[3] = 0
    q = gguf.quants.quantize(x, qtype)
    ours = dequantize(q.view(np.uint8), int(qtype), name)
    _assert_same(ours, gguf.quants.dequantize(q, qtype))
    assert np.abs(ours - x).max() < 0.5  # and it is a dequantization of x at all


def test_3d_tensor_keeps_leading_dims():
    raw = _random_blocks("Q4_K", 6, 2, np.random.default_rng(2)).reshape(2, 3, -1)
    assert dequantize(raw, GGMLType.Q4_K).shape == (2, 3, 512)


def test_unsupported_type_names_tensor_and_type():
    raw = np.zeros((2, 110), np.uint8)
    with pytest.raises(GGUFError, match=r"'blk\.0\.ffn_up\.weight'.*Q3_K"):
        dequantize(raw, GGMLType.Q3_K, "blk.0.ffn_up.weight")


@pytest.mark.slow
def test_real_file_every_tensor_matches_gguf_py(smollm_path, gguf_py_reader):
    tensors = load_tensors(smollm_path)
    assert list(tensors) == [t.name for t in gguf_py_reader.tensors]
    seen = set()
    for t in gguf_py_reader.tensors:
        ours = tensors[t.name]
        assert ours.dtype == torch.float32 and ours.is_contiguous()
        assert tuple(ours.shape) == tuple(int(d) for d in reversed(t.shape)), t.name
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        _assert_same(ours.numpy(), ref.reshape(ours.shape))
        seen.add(t.tensor_type.name)
    assert {"Q4_1", "Q8_0", "F32"} <= seen
    tensors["output_norm.weight"].add_(1)  # writable, not a view of the read-only mmap


def test_load_tensors_accepts_open_file(smollm_path):
    with read_gguf(smollm_path) as f:
        t = load_tensors(f)
        assert t["token_embd.weight"].shape == (49152, 576)
