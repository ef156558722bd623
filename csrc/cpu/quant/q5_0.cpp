// Q5_0 (ggml type 6): 32 5-bit quants u and an fp16 scale d; weight = d * (u - 16).
// GGUF keeps the low 4 bits as Q4_0 does and the fifth bits in a u32 qh (bit j
// for element j). llama-quantize writes it in Q4_K_M files for the tensors whose
// rows are not a multiple of 256 (SmolLM2-135M's 576, Qwen2.5-0.5B's 896), so
// for those models it is most of the file.
//
// Packed one quant per byte, the Q8_0 tile layout (block32.h): the 8-bit
// kernels run it unchanged with kOffset 16, at Q8_0's 34 bytes per 32 weights
// instead of GGUF's 22. A kernel reading the 5-bit planes directly would stream
// a third less at batch 1; this one reuses the tuned 8-bit paths.
#include <cmath>
#include <cstring>

#include "cpu/quant/block32.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {
namespace {

struct Q5_0 {
  static constexpr int64_t kType = 6;
  static constexpr const char* kName = "Q5_0";
  static constexpr int64_t kBlockBytes = 22;  // fp16 d, uint32 qh, uint8 qs[16]
  static constexpr bool kNibbles = false;
  static constexpr int kOffset = 16;
  static constexpr bool kHasMin = false;

  static void unpack(const uint8_t* block, uint8_t u[32], uint16_t* d, uint16_t* /*m*/) {
    std::memcpy(d, block, 2);
    uint32_t qh;
    std::memcpy(&qh, block + 2, 4);
    for (int j = 0; j < 16; ++j) {
      u[j] = static_cast<uint8_t>((block[6 + j] & 15) | (((qh >> j) & 1) << 4));
      u[j + 16] = static_cast<uint8_t>((block[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
  }

  // ggml-quants.c quantize_row_q5_0_ref: the signed value of largest magnitude
  // (first one on ties) maps to -16.
  static void quantize_block(const float* x, uint8_t* block) {
    const float max = signed_absmax32(x);
    const float d = max / -16.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    const uint16_t dh = float_to_half(d);
    std::memcpy(block, &dh, 2);
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const int lo = std::min(31, static_cast<int>(static_cast<int8_t>(x[j] * id + 16.5f)));
      const int hi = std::min(31, static_cast<int>(static_cast<int8_t>(x[j + 16] * id + 16.5f)));
      block[6 + j] = static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
      qh |= static_cast<uint32_t>((lo >> 4) & 1) << j;
      qh |= static_cast<uint32_t>((hi >> 4) & 1) << (j + 16);
    }
    std::memcpy(block + 2, &qh, 4);
  }
};

}  // namespace

const QuantFormat& q5_0_format() {
  static constexpr QuantFormat f = make_block32_format<Q5_0>();
  return f;
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
