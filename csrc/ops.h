// C++ signatures of every pyserve op. The CPU (csrc/cpu) and CUDA (csrc/cuda)
// implementations share these; csrc/torch_bindings.cpp declares the schemas.
//
// KV-cache layout (both devices):
//   key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]
// A token in cache slot s lives in block s / block_size at offset s % block_size.
//
// Batch layout (varlen, vLLM-v1 style): the new tokens of all sequences are
// packed into one flat dimension of num_tokens rows. Sequence i owns rows
// [query_start_loc[i], query_start_loc[i + 1]); seq_lens[i] counts its cached
// tokens *including* those new rows, so its first new token sits at position
// seq_lens[i] - (query_start_loc[i + 1] - query_start_loc[i]). Rows at or past
// query_start_loc[num_seqs] are padding.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

// pyserve::cpu's ops are what registration.cpp registers: compiled once for
// the baseline ISA, the KV-cache ops run there and the others (attention,
// sampling, layer ops; csrc/cpu/kernel_dispatch.cpp) call the same op of the
// active ISA variant. The sources compiled once per ISA variant
// (cmake/cpu_isa.cmake) define their ops in pyserve::cpu::<variant>
// (PYSERVE_CPU_CAPABILITY). Each variant declares every op; only those of
// PYSERVE_CPU_KERNEL_SOURCES are defined.
#define PYSERVE_OPS_DECL "ops_decl.inc"
#include "cpu/declare_per_variant.inc"
#undef PYSERVE_OPS_DECL

namespace pyserve::cuda {
#include "ops_decl.inc"
}  // namespace pyserve::cuda
