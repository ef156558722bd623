// Q8_0 (ggml type 8): 32 int8 quants q and an fp16 scale d; weight = d * q.
// Packed as unsigned u = q + 128 so that vpdpbusd (unsigned x signed) takes
// the weights; the kernel subtracts 128 * sum(q_a).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/quant/block32.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {
namespace {

struct Q8_0 {
  static constexpr int64_t kType = 8;
  static constexpr const char* kName = "Q8_0";
  static constexpr int64_t kBlockBytes = 34;  // fp16 d, int8 qs[32]
  static constexpr bool kNibbles = false;
  static constexpr int kOffset = 128;
  static constexpr bool kHasMin = false;

  static void unpack(const uint8_t* block, uint8_t u[32], uint16_t* d, uint16_t* /*m*/) {
    std::memcpy(d, block, 2);
    for (int j = 0; j < 32; ++j) u[j] = static_cast<uint8_t>(block[2 + j] ^ 0x80);
  }

  // ggml-quants.c quantize_row_q8_0_ref.
  static void quantize_block(const float* x, uint8_t* block) {
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    const uint16_t dh = float_to_half(d);
    std::memcpy(block, &dh, 2);
    for (int j = 0; j < 32; ++j) block[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[j] * id)));
  }
};

}  // namespace

const QuantFormat& q8_0_format() {
  static constexpr QuantFormat f = make_block32_format<Q8_0>();
  return f;
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
