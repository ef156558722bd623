"""The independent reference for the quantized ops: the `gguf` package's own
quantizer and dequantizer (gguf.quants, a numpy port of ggml-quants.c), and
the error bound that quantizing the activations to int8 implies."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

# ggml_type -> gguf's enum, for the formats the kernels cover.
QTYPES = {8: GGMLQuantizationType.Q8_0, 2: GGMLQuantizationType.Q4_0, 3: GGMLQuantizationType.Q4_1,
          6: GGMLQuantizationType.Q5_0, 7: GGMLQuantizationType.Q5_1,
          12: GGMLQuantizationType.Q4_K, 13: GGMLQuantizationType.Q5_K, 14: GGMLQuantizationType.Q6_K}
# Formats gguf can quantize (ggml's reference quantizers); the others' test weights are random valid blocks.
QUANTIZABLE = (8, 2, 3, 6, 7)
# Weights per block; also the activations' scale block in our kernels (Q8_0-like for 32, Q8_K-like for 256).
BLOCK_ELEMS = {8: 32, 2: 32, 3: 32, 6: 32, 7: 32, 12: 256, 13: 256, 14: 256}
BLOCK_BYTES = {8: 34, 2: 18, 3: 20, 6: 22, 7: 24, 12: 144, 13: 176, 14: 210}


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """[n, k] float32 with the spread of a real layer: rows of different scales, a few outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.02 + 0.1 * torch.rand(n, 1, generator=g))
    w += (torch.rand(n, k, generator=g) < 0.01) * torch.randn(n, k, generator=g) * 0.5
    return w


def gguf_blocks(w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """w quantized by gguf: [n, row_bytes] uint8, as a GGUF file stores it."""
    return torch.from_numpy(np.ascontiguousarray(quantize(w.numpy(), QTYPES[ggml_type])))


def random_blocks(n: int, k: int, ggml_type: int, seed: int) -> torch.Tensor:
    """[n, row_bytes] uint8 of random but valid blocks, for the formats gguf cannot quantize (the K-quants):
    every quant bit random, sub-block scales over the whole int8 range, fp16 d of either sign."""
    g = torch.Generator().manual_seed(seed)
    nb = k // BLOCK_ELEMS[ggml_type]
    blocks = torch.randint(0, 256, (n, nb, BLOCK_BYTES[ggml_type]), generator=g, dtype=torch.int64).to(torch.uint8)
    if ggml_type == 14:  # Q6_K: ql[128] qh[64] int8 scales[16] fp16 d
        d = (torch.randn(n, nb, 1, generator=g) * 2e-4).to(torch.float16)
        blocks[..., 208:] = d.view(torch.uint8)
    else:  # Q4_K, Q5_K: fp16 d, fp16 dmin, 6-bit scales and mins, [qh[32]], qs[128]
        d = (torch.randn(n, nb, 2, generator=g) * 4e-4).to(torch.float16)
        blocks[..., :4] = d.view(torch.uint8)
    return blocks.reshape(n, -1)


def weight_blocks(n: int, k: int, ggml_type: int, seed: int) -> torch.Tensor:
    """Test weights in ggml_type's GGUF blocks: gguf's quantization of a random layer, or random blocks."""
    if ggml_type in QUANTIZABLE:
        return gguf_blocks(random_weight(n, k, seed), ggml_type)
    return random_blocks(n, k, ggml_type, seed)


def gguf_dequantize(blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """gguf's dequantization of [n, row_bytes] blocks: [n, k] float32."""
    return torch.from_numpy(np.ascontiguousarray(dequantize(blocks.numpy(), QTYPES[ggml_type])))


def reference_linear(x: torch.Tensor, w_deq: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) in float64 with the dequantized weight."""
    y = x.double() @ w_deq.double().T
    return y if bias is None else y + bias.double()


def error_bound(x: torch.Tensor, w_deq: torch.Tensor, block: int = 32) -> torch.Tensor:
    """A bound on |quant_linear(x) - reference_linear(x)|, per output [m, n].

    The kernel computes sum_k W[j, k] q[i, k] d[i, b(k)] exactly in integers and
    scales it in fp32, where q = round(x / d) with d = max|x in the block| / 127,
    so |x - q d| <= d / 2 = amax / 254 per element (blocks of `block` values). Hence
        |err[i, j]| <= sum_b (amax[i, b] / 254) * sum_{k in b} |W[j, k]|     (activation rounding)
                     + (nb + 4) * 2^-23 * sum_k |x[i, k]| |W[j, k]|          (fp32 scaling and accumulation:
                                                                               a few roundings per block, nb blocks)
    with a 1e-5 relative margin on the first term for the rounding of x * (1 / d)."""
    m, k = x.shape
    nb = k // block
    amax = x.double().abs().reshape(m, nb, block).amax(-1)  # [m, nb]
    wabs = w_deq.double().abs()
    wsum = wabs.reshape(-1, nb, block).sum(-1)  # [n, nb]
    act = (amax / 254) @ wsum.T * (1 + 1e-5)
    fp = (nb + 4) * 2.0**-23 * (x.double().abs() @ wabs.T)
    return act + fp + 1e-30


def expected_rms_error(x: torch.Tensor, w_deq: torch.Tensor, block: int = 32) -> torch.Tensor:
    """The typical size of the same error, a scalar: rounding x to the grid d leaves an error of at most
    d / 2 per element, of variance at most d^2 / 12 (uniform), independent across elements, so
    err[i, j] has variance <= sum_b (d[i, b]^2 / 12) * sum_{k in b} W[j, k]^2. Returns the root of its
    mean over all outputs. The worst-case bound above is ~sqrt(in_features) looser; this one catches
    a kernel that is wrong by a little everywhere."""
    m, k = x.shape
    nb = k // block
    d = x.double().abs().reshape(m, nb, block).amax(-1) / 127
    w2 = (w_deq.double() ** 2).reshape(-1, nb, block).sum(-1)
    return ((d**2 / 12) @ w2.T).mean().sqrt()
