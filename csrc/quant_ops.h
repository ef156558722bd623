// Quantized-weight ops (issue 16): GGUF block formats kept quantized in
// memory and multiplied by kernels of our own. CPU only by design (on CUDA the
// weights are dequantized at load), so they live here rather than in
// ops_decl.inc, which is declared for both device namespaces. Formats:
// csrc/cpu/quant/formats.cpp; layout and arithmetic: csrc/cpu/quant/block32.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace pyserve::cpu {

// Repack one weight's GGUF rows into the layout quant_linear reads (tiles of
// 8 rows interleaved block by block; rows past out_features padded with
// zeros). Returns an opaque 1-D uint8 tensor.
at::Tensor quant_pack(const at::Tensor& blocks,  // [out_features, in_features / block_elems * block_bytes] uint8
                      int64_t ggml_type, int64_t in_features);

// y = x W^T (+ bias), W the packed weight. x's rows are quantized to int8 in
// blocks inside the op. A row's result is bit-identical whatever the number of
// rows, the row's position and the thread count.
at::Tensor quant_linear(const at::Tensor& x,       // [m, in_features] float32, stride(1) == 1
                        const at::Tensor& packed,  // quant_pack's result
                        int64_t ggml_type, int64_t out_features, int64_t in_features,
                        const std::optional<at::Tensor>& bias  // [out_features] float32
);  // -> [m, out_features] float32

// quant_linear into out, whose rows may be strided (a column slice of a wider
// tensor), so each shard of a fused layer writes its own columns in place.
void quant_linear_out(const at::Tensor& x,       // [m, in_features] float32, stride(1) == 1
                      const at::Tensor& packed,  // quant_pack's result
                      int64_t ggml_type, int64_t out_features, int64_t in_features,
                      const std::optional<at::Tensor>& bias,  // [out_features] float32
                      at::Tensor& out  // [m, out_features] float32, stride(1) == 1, stride(0) >= out_features
);

// Rows ids of a packed weight, dequantized exactly as ggml dequantizes them
// (the token embedding; a tied LM head shares the packed tensor).
at::Tensor quant_dequant_rows(const at::Tensor& packed,  // quant_pack's result
                              const at::Tensor& ids,     // [n] int64 in [0, out_features)
                              int64_t ggml_type, int64_t out_features, int64_t in_features);  // -> [n, in_features]

// fp32 rows -> GGUF blocks, bit-identical to ggml's quantize_row_*_ref.
at::Tensor quantize_rows(const at::Tensor& w,  // [rows, in_features] float32
                         int64_t ggml_type);   // -> [rows, in_features / block_elems * block_bytes] uint8

}  // namespace pyserve::cpu
