// Q4_0 (ggml type 2): 32 4-bit quants u and an fp16 scale d; weight = d * (u - 8).
// GGUF stores element j in the low nibble of byte j and element j + 16 in its
// high nibble, which is the order the block-32 kernel reads (block32.h).
#include <cmath>
#include <cstring>

#include "cpu/quant/block32.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {
namespace {

struct Q4_0 {
  static constexpr int64_t kType = 2;
  static constexpr const char* kName = "Q4_0";
  static constexpr int64_t kBlockBytes = 18;  // fp16 d, uint8 qs[16]
  static constexpr bool kNibbles = true;
  static constexpr int kOffset = 8;
  static constexpr bool kHasMin = false;

  static void unpack(const uint8_t* block, uint8_t u[32], uint16_t* d, uint16_t* /*m*/) {
    std::memcpy(d, block, 2);
    for (int j = 0; j < 16; ++j) {
      u[j] = block[2 + j] & 15;
      u[j + 16] = block[2 + j] >> 4;
    }
  }

  // ggml-quants.c quantize_row_q4_0_ref: the signed value of largest magnitude
  // (first one on ties) maps to -8.
  static void quantize_block(const float* x, uint8_t* block) {
    const float max = signed_absmax32(x);
    const float d = max / -8.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    const uint16_t dh = float_to_half(d);
    std::memcpy(block, &dh, 2);
    for (int j = 0; j < 16; ++j) {
      const int lo = std::min(15, static_cast<int>(static_cast<int8_t>(x[j] * id + 8.5f)));
      const int hi = std::min(15, static_cast<int>(static_cast<int8_t>(x[j + 16] * id + 8.5f)));
      block[2 + j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
};

}  // namespace

const QuantFormat& q4_0_format() {
  static constexpr QuantFormat f = make_block32_format<Q4_0>();
  return f;
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
