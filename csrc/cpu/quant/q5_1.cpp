// Q5_1 (ggml type 7): 32 5-bit quants u, an fp16 scale d and an fp16 min m;
// weight = d * u + m. llama-quantize's stand-in for Q5_K where rows are not a
// multiple of 256. Packed one quant per byte like Q5_0 (q5_0.cpp), with Q4_1's
// min term (the kernel adds m * d_a * sum(q_a) per block).
#include <algorithm>
#include <cfloat>
#include <cstring>

#include "cpu/quant/block32.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {
namespace {

struct Q5_1 {
  static constexpr int64_t kType = 7;
  static constexpr const char* kName = "Q5_1";
  static constexpr int64_t kBlockBytes = 24;  // fp16 d, fp16 m, uint32 qh, uint8 qs[16]
  static constexpr bool kNibbles = false;
  static constexpr int kOffset = 0;
  static constexpr bool kHasMin = true;

  static void unpack(const uint8_t* block, uint8_t u[32], uint16_t* d, uint16_t* m) {
    std::memcpy(d, block, 2);
    std::memcpy(m, block + 2, 2);
    uint32_t qh;
    std::memcpy(&qh, block + 4, 4);
    for (int j = 0; j < 16; ++j) {
      u[j] = static_cast<uint8_t>((block[8 + j] & 15) | (((qh >> j) & 1) << 4));
      u[j + 16] = static_cast<uint8_t>((block[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
  }

  // ggml-quants.c quantize_row_q5_1_ref.
  static void quantize_block(const float* x, uint8_t* block) {
    float min, max;
    min_max32(x, &min, &max);
    const float d = (max - min) / 31.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    const uint16_t dh = float_to_half(d), mh = float_to_half(min);
    std::memcpy(block, &dh, 2);
    std::memcpy(block + 2, &mh, 2);
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      // ggml casts to uint8_t without a clamp; (x - min) * id + 0.5 stays below 32 in floats.
      const int lo = static_cast<uint8_t>((x[j] - min) * id + 0.5f);
      const int hi = static_cast<uint8_t>((x[j + 16] - min) * id + 0.5f);
      block[8 + j] = static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
      qh |= static_cast<uint32_t>((lo >> 4) & 1) << j;
      qh |= static_cast<uint32_t>((hi >> 4) & 1) << (j + 16);
    }
    std::memcpy(block + 4, &qh, 4);
  }
};

}  // namespace

const QuantFormat& q5_1_format() {
  static constexpr QuantFormat f = make_block32_format<Q5_1>();
  return f;
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
