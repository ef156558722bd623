#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(pyserve, CUDA, m) {
  m.impl("reshape_and_cache", &pyserve::cuda::reshape_and_cache);
  m.impl("compute_slot_mapping", &pyserve::cuda::compute_slot_mapping);
  m.impl("paged_attention", &pyserve::cuda::paged_attention);
  m.impl("copy_blocks", &pyserve::cuda::copy_blocks);
  m.impl("sample", &pyserve::cuda::sample);
  m.impl("rms_norm", &pyserve::cuda::rms_norm);
  m.impl("rms_norm_inplace", &pyserve::cuda::rms_norm_inplace);
  m.impl("fused_add_rms_norm", &pyserve::cuda::fused_add_rms_norm);
  m.impl("silu_and_mul", &pyserve::cuda::silu_and_mul);
  m.impl("gelu_tanh_and_mul", &pyserve::cuda::gelu_tanh_and_mul);
  m.impl("rotary_embedding", &pyserve::cuda::rotary_embedding);
}
