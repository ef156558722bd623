// Q4_1 (ggml type 3): 32 4-bit quants u, an fp16 scale d and an fp16 min m;
// weight = d * u + m. The kernel adds m * d_a * sum(q_a) per block.
#include <algorithm>
#include <cfloat>
#include <cstring>

#include "cpu/quant/block32.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {
namespace {

struct Q4_1 {
  static constexpr int64_t kType = 3;
  static constexpr const char* kName = "Q4_1";
  static constexpr int64_t kBlockBytes = 20;  // fp16 d, fp16 m, uint8 qs[16]
  static constexpr bool kNibbles = true;
  static constexpr int kOffset = 0;
  static constexpr bool kHasMin = true;

  static void unpack(const uint8_t* block, uint8_t u[32], uint16_t* d, uint16_t* m) {
    std::memcpy(d, block, 2);
    std::memcpy(m, block + 2, 2);
    for (int j = 0; j < 16; ++j) {
      u[j] = block[4 + j] & 15;
      u[j + 16] = block[4 + j] >> 4;
    }
  }

  // ggml-quants.c quantize_row_q4_1_ref.
  static void quantize_block(const float* x, uint8_t* block) {
    float min, max;
    min_max32(x, &min, &max);
    const float d = (max - min) / 15.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    const uint16_t dh = float_to_half(d), mh = float_to_half(min);
    std::memcpy(block, &dh, 2);
    std::memcpy(block + 2, &mh, 2);
    for (int j = 0; j < 16; ++j) {
      const int lo = std::min(15, static_cast<int>(static_cast<int8_t>((x[j] - min) * id + 0.5f)));
      const int hi = std::min(15, static_cast<int>(static_cast<int8_t>((x[j + 16] - min) * id + 0.5f)));
      block[4 + j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
};

}  // namespace

const QuantFormat& q4_1_format() {
  static constexpr QuantFormat f = make_block32_format<Q4_1>();
  return f;
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
