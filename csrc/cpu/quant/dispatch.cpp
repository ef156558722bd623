// pyserve::cpu's quantized-weight ops (csrc/quant_ops.h), as registration.cpp
// registers them: each calls the same op of the active ISA variant
// (cpu/cpu_features.h), where the argument checks, the format table and the
// kernels live (ops.cpp and the format files, compiled once per variant).
// Compiled once, for the baseline ISA, like kernel_dispatch.cpp.
#include "cpu/cpu_dispatch.h"
#include "quant_ops.h"

namespace pyserve::cpu {

at::Tensor quant_pack(const at::Tensor& blocks, int64_t ggml_type, int64_t in_features) {
  return PYSERVE_CPU_DISPATCH(quant_pack, blocks, ggml_type, in_features);
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& packed, int64_t ggml_type, int64_t out_features,
                        int64_t in_features, const std::optional<at::Tensor>& bias) {
  return PYSERVE_CPU_DISPATCH(quant_linear, x, packed, ggml_type, out_features, in_features, bias);
}

void quant_linear_out(const at::Tensor& x, const at::Tensor& packed, int64_t ggml_type, int64_t out_features,
                      int64_t in_features, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  PYSERVE_CPU_DISPATCH(quant_linear_out, x, packed, ggml_type, out_features, in_features, bias, out);
}

at::Tensor quant_dequant_rows(const at::Tensor& packed, const at::Tensor& ids, int64_t ggml_type,
                              int64_t out_features, int64_t in_features) {
  return PYSERVE_CPU_DISPATCH(quant_dequant_rows, packed, ids, ggml_type, out_features, in_features);
}

at::Tensor quantize_rows(const at::Tensor& w, int64_t ggml_type) {
  return PYSERVE_CPU_DISPATCH(quantize_rows, w, ggml_type);
}

}  // namespace pyserve::cpu
