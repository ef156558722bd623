"""Typed Python wrappers over ``torch.ops.pyserve.*`` and their fake kernels.

The fake (meta) kernels describe output shapes without computing anything, so
the ops work under ``torch.compile``, ``torch.library.opcheck`` and
``FakeTensorMode``. Shapes and semantics are documented in ``csrc/ops_decl.inc``
and, for sampling, ``csrc/SAMPLING.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch  # before the extension: it links against libtorch

from pyserve import _C  # noqa: F401  (registers torch.ops.pyserve.*)

_ops = torch.ops.pyserve


class SampleResult(NamedTuple):
    token_ids: torch.Tensor  # [batch] int64
    logprobs: torch.Tensor  # [batch] float32, log-softmax of the raw logits
    top_ids: torch.Tensor  # [batch, num_top_logprobs] int64
    top_logprobs: torch.Tensor  # [batch, num_top_logprobs] float32


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = padding
) -> None:
    """Write the new tokens' K/V into their cache slots (in place)."""
    _ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def compute_slot_mapping(
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, cached + new tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    block_size: int,
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slot and position of every new token: ([num_tokens] int64, [num_tokens] int64)."""
    return _ops.compute_slot_mapping(block_tables, seq_lens, query_start_loc, block_size, num_tokens)


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,  # keys a query sees, its own included; None or <= 0 = off
    logits_soft_cap: float | None = None,  # scores -> cap * tanh(scores / cap); None or <= 0 = off
) -> torch.Tensor:
    """Causal varlen attention over the paged cache: [num_tokens, num_heads, head_dim].

    The query at position p attends to the key at position j iff j <= p and,
    with a window W, p - j < W (transformers' sliding-window causal mask).
    Scores are ``scale * q.k``, soft-capped (Gemma 2) before the softmax."""
    return _ops.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                                max_seq_len, sliding_window, logits_soft_cap)


def copy_blocks(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_mapping: torch.Tensor,  # [num_pairs, 2] int64 (src, dst)
) -> None:
    """Copy whole cache blocks src -> dst (copy-on-write), in place."""
    _ops.copy_blocks(key_cache, value_cache, block_mapping)


def sample(
    logits: torch.Tensor,  # [batch, vocab]
    temperature: torch.Tensor,  # [batch] float32, 0 = greedy
    top_k: torch.Tensor,  # [batch] int32, <= 0 = off
    top_p: torch.Tensor,  # [batch] float32, 1 = off
    min_p: torch.Tensor,  # [batch] float32, 0 = off
    seeds: torch.Tensor,  # [batch] int64
    steps: torch.Tensor,  # [batch] int64
    repetition_penalty: torch.Tensor,  # [batch] float32, 1 = off
    presence_penalty: torch.Tensor,  # [batch] float32, 0 = off
    frequency_penalty: torch.Tensor,  # [batch] float32, 0 = off
    prompt_token_ids: torch.Tensor | None = None,  # [batch, max_prompt_len] int64, -1 = padding
    output_token_ids: torch.Tensor | None = None,  # [batch, max_output_len] int64, -1 = padding
    logit_bias_ids: torch.Tensor | None = None,  # [batch, max_bias] int64, -1 = padding
    logit_bias_values: torch.Tensor | None = None,  # [batch, max_bias] float32
    num_top_logprobs: int = 0,
    allowed_token_bitmask: torch.Tensor | None = None,  # [batch, num_words] int32, None = no constraint
) -> SampleResult:
    """One token per row; see csrc/SAMPLING.md for the exact definition.

    ``allowed_token_bitmask`` (structured outputs): bit ``id % 32`` of word
    ``id // 32`` set means token ``id`` may be sampled (llguidance / xgrammar
    layout); ids ``>= 32 * num_words`` may not, bits of ids ``>= vocab`` are
    ignored, an all-ones (-1) row is unconstrained. Logprobs stay those of the
    raw logits. A row that allows no token samples -1 (logprob -inf)."""
    return SampleResult(
        *_ops.sample(
            logits, temperature, top_k, top_p, min_p, seeds, steps,
            repetition_penalty, presence_penalty, frequency_penalty,
            prompt_token_ids, output_token_ids, logit_bias_ids, logit_bias_values,
            num_top_logprobs, allowed_token_bitmask,
        )
    )


def rms_norm(
    input: torch.Tensor,  # [num_tokens, hidden], dense rows
    weight: torch.Tensor,  # [hidden]
    eps: float,
    weight_offset: float = 0.0,  # 0: Llama's weight; 1: Gemma's (1 + weight), with Gemma's rounding
) -> torch.Tensor:
    """(weight_offset + weight) * input / sqrt(mean(input^2) + eps) per row: [num_tokens, hidden]."""
    return _ops.rms_norm(input, weight, eps, weight_offset)


def rms_norm_inplace(
    input: torch.Tensor,  # [num_tokens, hidden] or [num_tokens, num_heads, head_dim], stride(-1) == 1
    weight: torch.Tensor,  # [input.shape[-1]]
    eps: float,
    weight_offset: float = 0.0,  # 0: Llama's weight; 1: Gemma's (1 + weight)
) -> None:
    """rms_norm over the last dimension, in place, on a strided view: e.g. the
    q heads of a fused QKV projection, ``qkv[:, :H * D].view(T, H, D)`` (Qwen3's
    and Gemma 3's per-head q/k norms), with no copy."""
    _ops.rms_norm_inplace(input, weight, eps, weight_offset)


def fused_add_rms_norm(
    input: torch.Tensor,  # [num_tokens, hidden], contiguous; becomes the normalized sum
    residual: torch.Tensor,  # [num_tokens, hidden], contiguous; becomes input + residual
    weight: torch.Tensor,  # [hidden]
    eps: float,
    weight_offset: float = 0.0,  # 0: Llama's weight; 1: Gemma's (1 + weight)
) -> None:
    """residual += input; input = rms_norm(residual) (both in place)."""
    _ops.fused_add_rms_norm(input, residual, weight, eps, weight_offset)


def silu_and_mul(input: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] = [gate | up]
    """silu(gate) * up: [num_tokens, d]."""
    return _ops.silu_and_mul(input)


def gelu_tanh_and_mul(input: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] = [gate | up]
    """gelu(gate, approximate="tanh") * up: [num_tokens, d] (Gemma's MLP)."""
    return _ops.gelu_tanh_and_mul(input)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], dense rows
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], dense rows
    cos: torch.Tensor,  # [max_positions, head_dim / 2]
    sin: torch.Tensor,  # [max_positions, head_dim / 2]
) -> None:
    """Rotate-half rotary embedding of every query and key head, in place."""
    _ops.rotary_embedding(positions, query, key, cos, sin)


# Quantized weights (issue 16, CPU only): GGUF block formats the kernels run as they are.
# ggml_type -> (weights per block, bytes per GGUF block, packed bytes per block of QUANT_TILE_ROWS rows);
# must match csrc/cpu/quant/ (the fakes size quant_pack's result from it).
QUANT_FORMATS: dict[int, tuple[int, int, int]] = {8: (32, 34, 272), 2: (32, 18, 144), 3: (32, 20, 160),
                                                   6: (32, 22, 272), 7: (32, 24, 288),
                                                   12: (256, 144, 1184), 13: (256, 176, 1440), 14: (256, 210, 1680)}
QUANT_TILE_ROWS = 8


def quant_packed_bytes(ggml_type: int, out_features: int, in_features: int) -> int:
    """Size of quant_pack's result for an out_features x in_features weight."""
    block_elems, _, tile_block_bytes = QUANT_FORMATS[ggml_type]
    return -(-out_features // QUANT_TILE_ROWS) * (in_features // block_elems) * tile_block_bytes


def quant_pack(
    blocks: torch.Tensor,  # [out_features, in_features / block_elems * block_bytes] uint8, GGUF rows
    ggml_type: int,
    in_features: int,
) -> torch.Tensor:
    """Repack a GGUF weight into the layout quant_linear reads: an opaque 1-D uint8 tensor."""
    return _ops.quant_pack(blocks, ggml_type, in_features)


def quant_linear(
    x: torch.Tensor,  # [m, in_features] float32, rows contiguous
    packed: torch.Tensor,  # quant_pack's result
    ggml_type: int,
    out_features: int,
    in_features: int,
    bias: torch.Tensor | None = None,  # [out_features] float32
) -> torch.Tensor:
    """x W^T (+ bias) with x quantized per row to int8 blocks: [m, out_features] float32, batch-invariant."""
    return _ops.quant_linear(x, packed, ggml_type, out_features, in_features, bias)


def quant_linear_out(
    x: torch.Tensor,  # [m, in_features] float32, rows contiguous
    packed: torch.Tensor,  # quant_pack's result
    ggml_type: int,
    out_features: int,
    in_features: int,
    bias: torch.Tensor | None,  # [out_features] float32
    out: torch.Tensor,  # [m, out_features] float32, stride(1) == 1, stride(0) >= out_features
) -> None:
    """quant_linear written into out (e.g. one shard's column slice of a fused q/k/v output)."""
    _ops.quant_linear_out(x, packed, ggml_type, out_features, in_features, bias, out)


def quant_dequant_rows(
    packed: torch.Tensor,  # quant_pack's result
    ids: torch.Tensor,  # [n] int64 in [0, out_features)
    ggml_type: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """Rows ids of the packed weight, dequantized as ggml does: [n, in_features] float32."""
    return _ops.quant_dequant_rows(packed, ids, ggml_type, out_features, in_features)


def quantize_rows(w: torch.Tensor, ggml_type: int) -> torch.Tensor:  # w: [rows, in_features] float32
    """fp32 rows -> GGUF blocks [rows, row_bytes] uint8, bit-identical to ggml's reference quantizers."""
    return _ops.quantize_rows(w, ggml_type)


@torch.library.register_fake("pyserve::compute_slot_mapping")
def _compute_slot_mapping_fake(block_tables, seq_lens, query_start_loc, block_size, num_tokens):
    out = block_tables.new_empty((num_tokens,), dtype=torch.int64)
    return out, torch.empty_like(out)


@torch.library.register_fake("pyserve::paged_attention")
def _paged_attention_fake(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, max_seq_len,
                          sliding_window=None, logits_soft_cap=None):
    return query.new_empty(query.shape)


@torch.library.register_fake("pyserve::reshape_and_cache")
def _reshape_and_cache_fake(key, value, key_cache, value_cache, slot_mapping):
    return None


@torch.library.register_fake("pyserve::copy_blocks")
def _copy_blocks_fake(key_cache, value_cache, block_mapping):
    return None


@torch.library.register_fake("pyserve::sample")
def _sample_fake(logits, temperature, top_k, top_p, min_p, seeds, steps, repetition_penalty,
                 presence_penalty, frequency_penalty, prompt_token_ids, output_token_ids,
                 logit_bias_ids, logit_bias_values, num_top_logprobs, allowed_token_bitmask=None):
    batch = logits.shape[0]
    return (
        logits.new_empty((batch,), dtype=torch.int64),
        logits.new_empty((batch,), dtype=torch.float32),
        logits.new_empty((batch, num_top_logprobs), dtype=torch.int64),
        logits.new_empty((batch, num_top_logprobs), dtype=torch.float32),
    )


@torch.library.register_fake("pyserve::rms_norm")
def _rms_norm_fake(input, weight, eps, weight_offset=0.0):
    return input.new_empty(input.shape)


@torch.library.register_fake("pyserve::rms_norm_inplace")
def _rms_norm_inplace_fake(input, weight, eps, weight_offset=0.0):
    return None


@torch.library.register_fake("pyserve::fused_add_rms_norm")
def _fused_add_rms_norm_fake(input, residual, weight, eps, weight_offset=0.0):
    return None


@torch.library.register_fake("pyserve::silu_and_mul")
def _silu_and_mul_fake(input):
    return input.new_empty((input.shape[0], input.shape[1] // 2))


@torch.library.register_fake("pyserve::gelu_tanh_and_mul")
def _gelu_tanh_and_mul_fake(input):
    return input.new_empty((input.shape[0], input.shape[1] // 2))


@torch.library.register_fake("pyserve::rotary_embedding")
def _rotary_embedding_fake(positions, query, key, cos, sin):
    return None


@torch.library.register_fake("pyserve::quant_pack")
def _quant_pack_fake(blocks, ggml_type, in_features):
    return blocks.new_empty((quant_packed_bytes(ggml_type, blocks.shape[0], in_features),), dtype=torch.uint8)


@torch.library.register_fake("pyserve::quant_linear")
def _quant_linear_fake(x, packed, ggml_type, out_features, in_features, bias=None):
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


@torch.library.register_fake("pyserve::quant_linear_out")
def _quant_linear_out_fake(x, packed, ggml_type, out_features, in_features, bias, out):
    return None


@torch.library.register_fake("pyserve::quant_dequant_rows")
def _quant_dequant_rows_fake(packed, ids, ggml_type, out_features, in_features):
    return packed.new_empty((ids.shape[0], in_features), dtype=torch.float32)


@torch.library.register_fake("pyserve::quantize_rows")
def _quantize_rows_fake(w, ggml_type):
    block_elems, block_bytes, _ = QUANT_FORMATS[ggml_type]
    return w.new_empty((w.shape[0], w.shape[1] // block_elems * block_bytes), dtype=torch.uint8)
