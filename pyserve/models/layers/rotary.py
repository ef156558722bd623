"""Rotary position embeddings (the HF "rotate_half" convention), with the rope scalings of
RopeConfig: linear, Llama 3's frequency-dependent one, YaRN, Phi-3's longrope, and llama.cpp's
per-frequency factors."""

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


def _longrope(inv_freq: torch.Tensor, head_dim: int, rope: RopeConfig, max_positions: int) -> tuple[torch.Tensor, float]:
    """Phi-3's per-frequency divisors: the long set when the served context exceeds the original one.

    transformers picks the set per forward call from the longest position in it, so one sequence's
    keys would be rotated differently depending on when and with whom it ran; like llama.cpp (and
    vLLM), we pick once, from the context length we serve (max_positions), so every position of every
    sequence is rotated the same way. Prompts and outputs shorter than the original context thus
    match transformers only when the served context is too; longer ones always do."""
    factors = rope.long_factor if max_positions > rope.original_max_position_embeddings else rope.short_factor
    if len(factors) != head_dim // 2:
        raise ValueError(f"{len(factors)} longrope factors for head_dim {head_dim} (want head_dim / 2 = {head_dim // 2})")
    scale = rope.attention_factor
    if scale is None:  # as transformers and llama.cpp's converter derive it
        scale = 1.0 if rope.factor <= 1 else math.sqrt(
            1 + math.log(rope.factor) / math.log(rope.original_max_position_embeddings))
    return inv_freq / torch.tensor(factors, dtype=torch.float64), scale


def rotary_frequencies(head_dim: int, rope: RopeConfig, max_positions: int = 0) -> tuple[torch.Tensor, float]:
    """The inverse frequencies [head_dim / 2] (float32) and the scale of the cos/sin tables, for a
    served context of max_positions (only longrope depends on it)."""
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
    elif rope.type == "longrope":
        inv_freq, scale = _longrope(inv_freq, head_dim, rope, max_positions)
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
        inv_freq, scale = rotary_frequencies(head_dim, rope, max_positions)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_positions, head_dim / 2]
        self.cos = (freqs.cos() * scale).to(device=device, dtype=dtype)
        self.sin = (freqs.sin() * scale).to(device=device, dtype=dtype)
        self.max_positions = max_positions

    def __call__(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotate q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] in place (views into
        the fused QKV projection are fine); positions: [tokens] int64."""
        _ops.rotary_embedding(positions, q, k, self.cos, self.sin)
