// The quantized-weight ops (csrc/quant_ops.h): argument checks, allocation,
// and the hand-off to the format's functions (csrc/cpu/quant/format.h).
#include "quant_ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/quant/format.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY {
namespace {

using quant::QuantFormat;

// Ask Linux for 2 MiB pages under the whole 2 MiB-aligned part of a fresh
// buffer, before it is written. A decode step streams every weight once from
// DRAM; with 4 KiB pages that is a TLB miss every 4 KiB of every stream (on
// the development VM: Q6_K at m = 1, 4-5% slower). Only a hint: where the
// kernel says no (THP "never") nothing changes, and no byte is allocated
// beyond what the buffer covers.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

const QuantFormat& format_of(int64_t ggml_type) {
  const QuantFormat* f = quant::find_format(ggml_type);
  TORCH_CHECK(f != nullptr, "ggml_type ", ggml_type, " has no quantized kernel; supported: ",
              quant::supported_formats());
  return *f;
}

void check_features(const QuantFormat& f, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(in_features > 0 && in_features % f.block_elems == 0, "in_features must be a positive multiple of ",
              f.block_elems, " (", f.name, " blocks), got ", in_features);
  TORCH_CHECK(out_features > 0, "out_features must be positive, got ", out_features);
}

void check_packed(const at::Tensor& packed, const QuantFormat& f, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(packed.dim() == 1 && packed.scalar_type() == at::kByte,
              "packed must be quant_pack's 1-D uint8 tensor, got ", packed.scalar_type(), " of shape ",
              packed.sizes());
  TORCH_CHECK(packed.is_contiguous(), "packed must be contiguous");
  const int64_t want = quant::packed_bytes(f, out_features, in_features);
  TORCH_CHECK(packed.numel() == want, "packed has ", packed.numel(), " bytes, but a ", f.name, " weight of ",
              out_features, " x ", in_features, " packs to ", want, " (wrong ggml_type or shape?)");
}

void check_linear(const at::Tensor& x, const at::Tensor& packed, const QuantFormat& f, int64_t out_features,
                  int64_t in_features, const std::optional<at::Tensor>& bias) {
  check_features(f, out_features, in_features);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [m, in_features], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == in_features, "x has ", x.size(1), " columns but in_features is ", in_features);
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "x's rows must be contiguous (stride(1) == 1), got strides ",
              x.strides());
  check_packed(packed, f, out_features, in_features);
  TORCH_CHECK(packed.device() == x.device(), "packed is on ", packed.device(), " but x is on ", x.device());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == out_features, "bias must be [out_features] = [", out_features,
                "], got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == at::kFloat, "bias must be float32, got ", b.scalar_type());
    TORCH_CHECK(b.is_contiguous(), "bias must be contiguous");
    TORCH_CHECK(b.device() == x.device(), "bias is on ", b.device(), " but x is on ", x.device());
  }
}

void run_linear(const at::Tensor& x, const at::Tensor& packed, const QuantFormat& f, int64_t out_features,
                int64_t in_features, const std::optional<at::Tensor>& bias, float* out, int64_t ldo) {
  f.linear(x.data_ptr<float>(), x.stride(0), x.size(0), packed.data_ptr<uint8_t>(), out_features, in_features,
           bias.has_value() ? bias->data_ptr<float>() : nullptr, out, ldo);
}

}  // namespace

at::Tensor quant_pack(const at::Tensor& blocks, int64_t ggml_type, int64_t in_features) {
  const QuantFormat& f = format_of(ggml_type);
  TORCH_CHECK(blocks.dim() == 2, "blocks must be 2-D [out_features, row_bytes], got shape ", blocks.sizes());
  TORCH_CHECK(blocks.scalar_type() == at::kByte, "blocks must be uint8, got ", blocks.scalar_type());
  check_features(f, blocks.size(0), in_features);
  const int64_t nb = in_features / f.block_elems, row_bytes = nb * f.block_bytes;
  TORCH_CHECK(blocks.size(1) == row_bytes, "blocks must have in_features / ", f.block_elems, " * ", f.block_bytes,
              " = ", row_bytes, " bytes per row (", f.name, "), got ", blocks.size(1));
  TORCH_CHECK(blocks.stride(1) == 1, "blocks' rows must be contiguous (stride(1) == 1), got strides ",
              blocks.strides());
  const int64_t out_features = blocks.size(0);
  const int64_t tiles = (out_features + quant::kTileRows - 1) / quant::kTileRows;
  at::Tensor packed = at::empty({quant::packed_bytes(f, out_features, in_features)}, blocks.options());
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  advise_huge_pages(dst, packed.numel());
  const int64_t stride = blocks.stride(0), tile_bytes = nb * f.tile_block_bytes;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * quant::kTileRows;
      f.pack_tile(src + r0 * stride, stride, std::min(quant::kTileRows, out_features - r0), nb, dst + t * tile_bytes);
    }
  });
  return packed;
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& packed, int64_t ggml_type, int64_t out_features,
                        int64_t in_features, const std::optional<at::Tensor>& bias) {
  const QuantFormat& f = format_of(ggml_type);
  check_linear(x, packed, f, out_features, in_features, bias);
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  run_linear(x, packed, f, out_features, in_features, bias, out.data_ptr<float>(), out_features);
  return out;
}

void quant_linear_out(const at::Tensor& x, const at::Tensor& packed, int64_t ggml_type, int64_t out_features,
                      int64_t in_features, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const QuantFormat& f = format_of(ggml_type);
  check_linear(x, packed, f, out_features, in_features, bias);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == out_features,
              "out must be [m, out_features] = [", x.size(0), ", ", out_features, "], got shape ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out must be float32, got ", out.scalar_type());
  TORCH_CHECK(out.device() == x.device(), "out is on ", out.device(), " but x is on ", x.device());
  TORCH_CHECK((out.stride(1) == 1 || out_features == 1) && (out.stride(0) >= out_features || out.size(0) <= 1),
              "out's rows must be contiguous and must not overlap (stride(1) == 1, stride(0) >= out_features), got "
              "strides ", out.strides());
  run_linear(x, packed, f, out_features, in_features, bias, out.data_ptr<float>(), out.stride(0));
}

at::Tensor quant_dequant_rows(const at::Tensor& packed, const at::Tensor& ids, int64_t ggml_type,
                              int64_t out_features, int64_t in_features) {
  const QuantFormat& f = format_of(ggml_type);
  check_features(f, out_features, in_features);
  check_packed(packed, f, out_features, in_features);
  TORCH_CHECK(ids.dim() == 1, "ids must be 1-D [n], got shape ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.device() == packed.device(), "ids is on ", ids.device(), " but packed is on ", packed.device());
  const at::Tensor idc = ids.contiguous();
  const int64_t n = idc.numel();
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < out_features, "ids[", i, "] = ", id[i], " is outside [0, out_features = ",
                out_features, ")");
  }
  at::Tensor out = at::empty({n, in_features}, packed.options().dtype(at::kFloat));
  const int64_t nb = in_features / f.block_elems, tile_bytes = nb * f.tile_block_bytes;
  const uint8_t* src = packed.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / in_features), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      f.dequant_row(src + (id[i] / quant::kTileRows) * tile_bytes, id[i] % quant::kTileRows, nb,
                    dst + i * in_features);
    }
  });
  return out;
}

at::Tensor quantize_rows(const at::Tensor& w, int64_t ggml_type) {
  const QuantFormat& f = format_of(ggml_type);
  TORCH_CHECK(f.quantize_row != nullptr, "quantize_rows has no quantizer for ", f.name);
  TORCH_CHECK(w.dim() == 2, "w must be 2-D [rows, in_features], got shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat, "w must be float32, got ", w.scalar_type());
  TORCH_CHECK(w.size(1) % f.block_elems == 0, "w's in_features must be a multiple of ", f.block_elems, " (", f.name,
              " blocks), got ", w.size(1));
  const at::Tensor wc = w.contiguous();
  const int64_t rows = w.size(0), nb = w.size(1) / f.block_elems, row_bytes = nb * f.block_bytes;
  at::Tensor out = at::empty({rows, row_bytes}, w.options().dtype(at::kByte));
  const float* src = wc.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, w.size(1))),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) f.quantize_row(src + r * w.size(1), nb, dst + r * row_bytes);
                   });
  return out;
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY
