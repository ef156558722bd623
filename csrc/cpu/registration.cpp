#include <torch/library.h>

#include "ops.h"
#include "quant_ops.h"

TORCH_LIBRARY_IMPL(pyserve, CPU, m) {
  m.impl("reshape_and_cache", &pyserve::cpu::reshape_and_cache);
  m.impl("compute_slot_mapping", &pyserve::cpu::compute_slot_mapping);
  m.impl("paged_attention", &pyserve::cpu::paged_attention);
  m.impl("copy_blocks", &pyserve::cpu::copy_blocks);
  m.impl("sample", &pyserve::cpu::sample);
  m.impl("rms_norm", &pyserve::cpu::rms_norm);
  m.impl("rms_norm_inplace", &pyserve::cpu::rms_norm_inplace);
  m.impl("fused_add_rms_norm", &pyserve::cpu::fused_add_rms_norm);
  m.impl("silu_and_mul", &pyserve::cpu::silu_and_mul);
  m.impl("gelu_tanh_and_mul", &pyserve::cpu::gelu_tanh_and_mul);
  m.impl("rotary_embedding", &pyserve::cpu::rotary_embedding);
  m.impl("quant_pack", &pyserve::cpu::quant_pack);
  m.impl("quant_linear", &pyserve::cpu::quant_linear);
  m.impl("quant_linear_out", &pyserve::cpu::quant_linear_out);
  m.impl("quant_dequant_rows", &pyserve::cpu::quant_dequant_rows);
  m.impl("quantize_rows", &pyserve::cpu::quantize_rows);
}
