"""Rotary position embeddings (the HF "rotate_half" convention), with the rope scalings of
RopeConfig: linear, Llama 3's frequency-dependent one, YaRN, and llama.cpp's per-frequency factors."""

from __future__ import annotations

import math

import torch

from pyserve import _ops
from pyserve.config import RopeConfig


def _yarn_attention_factor(rope: RopeConfig) -> float:
    """YaRN's cos/sin scale: given, or 0.1 ln(factor) + 1 (with DeepSeek's mscale ratio when set)."""
    if rope.attention_factor is not None:
        return rope.attention_factor

    def mscale(m: float) -> float:
        return 1.0 if rope.factor <= 1 else 0.1 * m * math.log(rope.factor) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.mscale) / mscale(rope.mscale_all_dim)
    return mscale(1.0)


def _yarn(inv_freq: torch.Tensor, head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Interpolated (divided by factor) below the dimensions that turn fewer than beta_slow times over
    the original context, extrapolated (kept) above those that turn more than beta_fast times, and a
    linear ramp between (YaRN, arXiv 2309.00071, section 3.2)."""

    def dim_for(rotations: float) -> float:
        return head_dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta))

    low, high = dim_for(rope.beta_fast), dim_for(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp is a step
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return inv_freq / rope.factor * ramp + inv_freq * (1 - ramp)


def rotary_frequencies(head_dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """The inverse frequencies [head_dim / 2] (float32) and the scale of the cos/sin tables."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scale = 1.0
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, and the band
        # between is interpolated (Llama 3.1 paper, section 3).
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq, scaled)
    elif rope.type == "yarn":
        inv_freq = _yarn(inv_freq, head_dim, rope)
        scale = _yarn_attention_factor(rope)
    elif rope.type != "default":
        raise ValueError(f"unknown rope type {rope.type!r}")
    if rope.freq_factors is not None:
        if len(rope.freq_factors) != head_dim // 2:
            raise ValueError(f"{len(rope.freq_factors)} rope frequency factors for head_dim {head_dim} "
                             f"(want head_dim / 2 = {head_dim // 2})")
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float64)
    return inv_freq.float(), scale


class RotaryEmbedding:
    """cos/sin tables for every position up to max_positions, built once."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig, device: torch.device, dtype: torch.dtype):
        inv_freq, scale = rotary_frequencies(head_dim, rope)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_positions, head_dim / 2]
        self.cos = (freqs.cos() * scale).to(device=device, dtype=dtype)
        self.sin = (freqs.sin() * scale).to(device=device, dtype=dtype)
        self.max_positions = max_positions

    def __call__(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotate q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] in place (views into
        the fused QKV projection are fine); positions: [tokens] int64."""
        _ops.rotary_embedding(positions, q, k, self.cos, self.sin)
