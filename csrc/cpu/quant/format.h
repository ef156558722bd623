// What the quantized-matmul ops (csrc/cpu/quant/ops.cpp) need from one GGUF
// block format. Each format is one file (q8_0.cpp, q4_0.cpp, ...) that fills a
// QuantFormat; formats.cpp lists them. The ops only see this table, so a new
// format (the K-quants: their own activation blocks, their own kernel) plugs in
// without touching the ops. Each ISA variant has its own tables (this code is
// compiled once per variant), built at compile time (constexpr): variant code
// may not initialize anything at import (cmake/cpu_isa.cmake).
//
// Packed layout, common to every format and to every ISA variant (the VNNI
// kernel reads two neighbouring tiles at once, the others one; a weight packed
// under one variant runs under any): the out_features GGUF rows are cut into
// tiles of kTileRows rows (the last one padded with zero blocks); a tile
// stores, block after block, kTileRows rows' worth of one block in whatever
// interleaved order the format's kernel reads fastest. A tile is
// nb * tile_block_bytes bytes and tiles follow each other, so the packed weight
// is ceil(out_features / kTileRows) * nb * tile_block_bytes bytes.
#pragma once

#ifndef PYSERVE_CPU_CAPABILITY
#error "csrc/cpu/quant/ is compiled once per CPU ISA variant (PYSERVE_CPU_KERNEL_SOURCES, cmake/cpu_isa.cmake); baseline code reaches it through csrc/quant_ops.h"
#endif

#include <cstdint>

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {

// Output columns computed together: one 8-lane fp32 vector per tile.
constexpr int64_t kTileRows = 8;

struct QuantFormat {
  int64_t ggml_type;  // ggml_type enum value (GGUF tensor type)
  const char* name;   // "Q4_1"
  int64_t block_elems;       // weights per GGUF block
  int64_t block_bytes;       // bytes per GGUF block
  int64_t tile_block_bytes;  // packed bytes of one block of kTileRows rows

  // GGUF rows -> one packed tile. rows: `nrows` (1..kTileRows) rows of nb
  // blocks each, row_stride bytes apart; rows past nrows are packed as zeros.
  void (*pack_tile)(const uint8_t* rows, int64_t row_stride, int64_t nrows, int64_t nb, uint8_t* tile);

  // Row r (< kTileRows) of one packed tile, dequantized exactly as ggml
  // dequantizes the GGUF block: out[nb * block_elems].
  void (*dequant_row)(const uint8_t* tile, int64_t r, int64_t nb, float* out);

  // ggml's reference quantizer (quantize_row_*_ref) for one row:
  // x[nb * block_elems] -> nb GGUF blocks, bit for bit. nullptr: not offered.
  void (*quantize_row)(const float* x, int64_t nb, uint8_t* out);

  // out[i, j] = sum_k x[i, k] W[j, k] (+ bias[j]) for i < m, j < out_features.
  // x rows ldx floats apart, out rows ldo floats apart. Quantizes x's rows
  // itself and splits the columns (tiles) over threads; a row's result does
  // not depend on m, on the row's position or on the thread count.
  void (*linear)(const float* x, int64_t ldx, int64_t m, const uint8_t* packed, int64_t out_features,
                 int64_t in_features, const float* bias, float* out, int64_t ldo);
};

// The format for a ggml type, or nullptr when there is no kernel for it.
const QuantFormat* find_format(int64_t ggml_type);

// "Q8_0 (8), Q4_0 (2), ..." for error messages.
const char* supported_formats();

inline int64_t packed_bytes(const QuantFormat& f, int64_t out_features, int64_t in_features) {
  const int64_t tiles = (out_features + kTileRows - 1) / kTileRows;
  return tiles * (in_features / f.block_elems) * f.tile_block_bytes;
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
