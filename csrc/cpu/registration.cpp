#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(pyserve, CPU, m) {
  m.impl("reshape_and_cache", &pyserve::cpu::reshape_and_cache);
  m.impl("compute_slot_mapping", &pyserve::cpu::compute_slot_mapping);
  m.impl("paged_attention", &pyserve::cpu::paged_attention);
  m.impl("copy_blocks", &pyserve::cpu::copy_blocks);
  m.impl("sample", &pyserve::cpu::sample);
}
