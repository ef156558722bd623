// The formats the quantized ops know. Adding one: its file defines
// <name>_format(), and one line here lists it (plus its file in CMakeLists.txt
// and its sizes in pyserve/_ops.py's QUANT_FORMATS, which the fake kernels use).
#include "cpu/quant/format.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {

const QuantFormat& q8_0_format();
const QuantFormat& q4_0_format();
const QuantFormat& q4_1_format();
const QuantFormat& q5_0_format();
const QuantFormat& q5_1_format();
const QuantFormat& q4_k_format();
const QuantFormat& q5_k_format();
const QuantFormat& q6_k_format();

namespace {
using FormatFn = const QuantFormat& (*)();
constexpr FormatFn kFormats[] = {&q8_0_format, &q4_0_format, &q4_1_format, &q5_0_format, &q5_1_format,
                                &q4_k_format, &q5_k_format, &q6_k_format};
}  // namespace

const QuantFormat* find_format(int64_t ggml_type) {
  for (FormatFn f : kFormats) {
    if (f().ggml_type == ggml_type) return &f();
  }
  return nullptr;
}

const char* supported_formats() { return "Q8_0 (8), Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q4_K (12), Q5_K (13), Q6_K (14)"; }

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
