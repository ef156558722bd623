"""The independent reference for the quantized ops: the `gguf` package's own
quantizer and dequantizer (gguf.quants, a numpy port of ggml-quants.c), and
the error bound that quantizing the activations to int8 implies."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

# ggml_type -> gguf's enum, for the formats the kernels cover.
QTYPES = {8: GGMLQuantizationType.Q8_0, 2: GGMLQuantizationType.Q4_0, 3: GGMLQuantizationType.Q4_1}
BLOCK = 32


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """[n, k] float32 with the spread of a real layer: rows of different scales, a few outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.02 + 0.1 * torch.rand(n, 1, generator=g))
    w += (torch.rand(n, k, generator=g) < 0.01) * torch.randn(n, k, generator=g) * 0.5
    return w


def gguf_blocks(w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """w quantized by gguf: [n, row_bytes] uint8, as a GGUF file stores it."""
    return torch.from_numpy(np.ascontiguousarray(quantize(w.numpy(), QTYPES[ggml_type])))


def gguf_dequantize(blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """gguf's dequantization of [n, row_bytes] blocks: [n, k] float32."""
    return torch.from_numpy(np.ascontiguousarray(dequantize(blocks.numpy(), QTYPES[ggml_type])))


def reference_linear(x: torch.Tensor, w_deq: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) in float64 with the dequantized weight."""
    y = x.double() @ w_deq.double().T
    return y if bias is None else y + bias.double()


def error_bound(x: torch.Tensor, w_deq: torch.Tensor) -> torch.Tensor:
    """A bound on |quant_linear(x) - reference_linear(x)|, per output [m, n].

    The kernel computes sum_k W[j, k] q[i, k] d[i, b(k)] exactly in integers and
    scales it in fp32, where q = round(x / d) with d = max|x in the block| / 127,
    so |x - q d| <= d / 2 = amax / 254 per element. Hence
        |err[i, j]| <= sum_b (amax[i, b] / 254) * sum_{k in b} |W[j, k]|     (activation rounding)
                     + (nb + 4) * 2^-23 * sum_k |x[i, k]| |W[j, k]|          (fp32 scaling and accumulation:
                                                                               a few roundings per block, nb blocks)
    with a 1e-5 relative margin on the first term for the rounding of x * (1 / d)."""
    m, k = x.shape
    nb = k // BLOCK
    amax = x.double().abs().reshape(m, nb, BLOCK).amax(-1)  # [m, nb]
    wabs = w_deq.double().abs()
    wsum = wabs.reshape(-1, nb, BLOCK).sum(-1)  # [n, nb]
    act = (amax / 254) @ wsum.T * (1 + 1e-5)
    fp = (nb + 4) * 2.0**-23 * (x.double().abs() @ wabs.T)
    return act + fp + 1e-30


def expected_rms_error(x: torch.Tensor, w_deq: torch.Tensor) -> torch.Tensor:
    """The typical size of the same error, a scalar: rounding x to the grid d leaves an error of at most
    d / 2 per element, of variance at most d^2 / 12 (uniform), independent across elements, so
    err[i, j] has variance <= sum_b (d[i, b]^2 / 12) * sum_{k in b} W[j, k]^2. Returns the root of its
    mean over all outputs. The worst-case bound above is ~sqrt(in_features) looser; this one catches
    a kernel that is wrong by a little everywhere."""
    m, k = x.shape
    nb = k // BLOCK
    d = x.double().abs().reshape(m, nb, BLOCK).amax(-1) / 127
    w2 = (w_deq.double() ** 2).reshape(-1, nb, BLOCK).sum(-1)
    return ((d**2 / 12) @ w2.T).mean().sqrt()
