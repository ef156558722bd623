"""Vectorized dequantization of ggml tensor blocks to float32 (numpy, no per-block Python loops).

Block layouts follow ggml-quants.c; the float operations are done in the same order as gguf-py's
`gguf.quants` so results agree bit for bit. Each kernel takes `blocks`, a (n_blocks, block_bytes)
uint8 array, and returns (n_blocks, block_elements) float32, writing into one preallocated output
and updating it in place where it can, because at ~100M elements the temporaries dominate.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pyserve.loader.gguf_types import BLOCK_LAYOUT, GGMLType, GGUFError, type_name

QK_K = 256
_F16 = np.float16
_F32 = np.float32


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte `start` of every block, as (n_blocks, 1) float32."""
    return blocks[:, start : start + 2].view(_F16).astype(_F32)


def _f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(_F32).copy()  # a copy: the caller gets a writable array, not the mmap


def _f16_tensor(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(_F16).astype(_F32)


def _bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an f32: widen to u32 and shift into place.
    out = blocks.view(np.uint16).astype(np.uint32)
    out <<= 16
    return out.view(_F32)


def _nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    """Low nibbles of qs (…, k) into out[..., 0, :] and high nibbles into out[..., 1, :]."""
    np.bitwise_and(qs, 0x0F, out=out[..., 0, :], casting="unsafe")
    np.right_shift(qs, 4, out=out[..., 1, :], casting="unsafe")


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | qs: 16 bytes, element j in the low nibble of qs[j], element j+16 in the high one.
    out = np.empty((len(blocks), 2, 16), _F32)
    _nibbles(blocks[:, 2:18], out)
    out -= 8
    out *= _f16(blocks, 0)[:, :, None]
    return out.reshape(-1, 32)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | m: f16 | qs: 16 bytes; x = d * q + m.
    out = np.empty((len(blocks), 2, 16), _F32)
    _nibbles(blocks[:, 4:20], out)
    out *= _f16(blocks, 0)[:, :, None]
    out += _f16(blocks, 2)[:, :, None]
    return out.reshape(-1, 32)


def _fifth_bits(qh: np.ndarray, q: np.ndarray) -> None:
    """OR bit j of each block's little-endian u32 qh into element j of q (n, 2, 16) as its bit 4."""
    bits = (qh.view("<u4") >> np.arange(32, dtype=np.uint32)) & 1  # (n, 32): element j's 5th bit
    q |= (bits.astype(np.uint8) << 4).reshape(-1, 2, 16)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | qh: u32 | qs: 16 bytes; as Q4_0 with bit j of qh as element j's 5th bit, x = d * (q - 16).
    # llama-quantize writes it where a K-quant cannot go (rows not a multiple of 256) in Q4_K_M files.
    q = np.empty((len(blocks), 2, 16), np.uint8)
    _nibbles(blocks[:, 6:22], q)
    _fifth_bits(blocks[:, 2:6], q)
    out = q.astype(_F32)
    out -= 16
    out *= _f16(blocks, 0)[:, :, None]
    return out.reshape(-1, 32)


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | m: f16 | qh: u32 | qs: 16 bytes; x = d * q + m (Q5_K_M's fallback type).
    q = np.empty((len(blocks), 2, 16), np.uint8)
    _nibbles(blocks[:, 8:24], q)
    _fifth_bits(blocks[:, 4:8], q)
    out = q.astype(_F32)
    out *= _f16(blocks, 0)[:, :, None]
    out += _f16(blocks, 2)[:, :, None]
    return out.reshape(-1, 32)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | qs: 32 x int8.
    out = blocks[:, 2:].view(np.int8).astype(_F32)
    out *= _f16(blocks, 0)
    return out


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K/Q5_K's 12 bytes of 6-bit (scale, min) pairs for the 8 sub-blocks.

    Sub-blocks 0-3 use the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take
    their low 4 bits from bytes 8-11 and their top 2 bits from the spare top bits of bytes 0-7.
    """
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | dmin: f16 | scales: 12 | qs: 128. Each 32 bytes of qs hold two sub-blocks of 32:
    # the low nibbles (sub-block 2i) and the high nibbles (sub-block 2i+1).
    n = len(blocks)
    sc, mn = _k_scales(blocks[:, 4:16])
    d = _f16(blocks, 0) * sc.astype(_F32)
    dm = _f16(blocks, 2) * mn.astype(_F32)
    out = np.empty((n, 4, 2, 32), _F32)
    _nibbles(blocks[:, 16:144].reshape(n, 4, 32), out)
    out = out.reshape(n, 8, 32)
    out *= d[:, :, None]
    out -= dm[:, :, None]
    return out.reshape(n, QK_K)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    # d | dmin | scales: 12 | qh: 32 | qs: 128. As Q4_K, plus a 5th bit: bit j of qh[l] belongs
    # to element l of sub-block j.
    n = len(blocks)
    sc, mn = _k_scales(blocks[:, 4:16])
    d = _f16(blocks, 0) * sc.astype(_F32)
    dm = _f16(blocks, 2) * mn.astype(_F32)
    qh = blocks[:, 16:48]
    ql = blocks[:, 48:176].reshape(n, 4, 32)
    hi = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (n, 8, 32)
    q = np.empty((n, 4, 2, 32), np.uint8)
    _nibbles(ql, q)
    q = q.reshape(n, 8, 32)
    q |= hi << 4
    out = q.astype(_F32)
    out *= d[:, :, None]
    out -= dm[:, :, None]
    return out.reshape(n, QK_K)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    # ql: 128 | qh: 64 | scales: 16 x int8 | d: f16. Two halves of 128 elements; in each, ql's 64
    # bytes give low nibbles (elements 0-63) and high nibbles (64-127), and qh's 32 bytes hold the
    # top 2 bits of elements l, l+32, l+64, l+96 at bit pairs 0, 2, 4, 6.
    n = len(blocks)
    ql = blocks[:, :128].reshape(n, 2, 1, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    q = np.empty((n, 2, 2, 64), np.uint8)
    np.bitwise_and(ql[:, :, 0], 0x0F, out=q[:, :, 0])
    np.right_shift(ql[:, :, 0], 4, out=q[:, :, 1])
    q = q.reshape(n, 2, 4, 32)
    q |= ((qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3) << 4
    out = q.view(np.int8).astype(_F32)
    out -= 32
    d = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(_F32)
    out = out.reshape(n, 16, 16)
    out *= d[:, :, None]
    return out.reshape(n, QK_K)


KERNELS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: _f32,
    GGMLType.F16: _f16_tensor,
    GGMLType.BF16: _bf16,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}


def is_supported(ggml_type: int) -> bool:
    return ggml_type in KERNELS


def dequantize(raw: np.ndarray, ggml_type: int, name: str = "<tensor>") -> np.ndarray:
    """Float32 values of a tensor's raw bytes.

    `raw` is uint8 shaped (rows..., bytes per row), as `GGUFFile.raw` gives it; the result is
    (rows..., elements per row). Raises GGUFError naming the tensor for types without a kernel.
    """
    kernel = KERNELS.get(ggml_type)
    if kernel is None:
        supported = ", ".join(GGMLType(t).name for t in KERNELS)
        raise GGUFError(f"tensor {name!r}: cannot dequantize ggml type {type_name(ggml_type)} (supported: {supported})")
    block, block_bytes = BLOCK_LAYOUT[ggml_type]
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if raw.ndim == 0 or raw.shape[-1] % block_bytes:
        raise GGUFError(f"tensor {name!r}: raw bytes of shape {raw.shape} are not whole {type_name(ggml_type)} blocks per row")
    out = kernel(raw.reshape(-1, block_bytes))
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // block_bytes * block)
