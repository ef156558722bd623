// Activations for the block-32 formats: each row of x quantized to int8 in
// blocks of 32, as ggml's Q8_0/Q8_1 activations but with an fp32 scale:
//   d = max|x| / 127, q = round_half_even(x * (1 / d)), s = sum of the block's q
// (s serves the formats whose weights carry an offset: Q4_0's -8, Q4_1's min,
// and Q8_0 stored as unsigned q + 128 for vpdpbusd). |q| <= 127.
#pragma once

#include <cstdint>
#include <memory>

namespace pyserve::cpu::quant {

struct Q8Rows {
  int64_t m = 0, nb = 0;
  std::unique_ptr<int8_t[]> q;   // [m, nb * 32]
  std::unique_ptr<float[]> d;    // [m, nb]
  std::unique_ptr<int32_t[]> s;  // [m, nb]

  const int8_t* row_q(int64_t i) const { return q.get() + i * nb * 32; }
  const float* row_d(int64_t i) const { return d.get() + i * nb; }
  const int32_t* row_s(int64_t i) const { return s.get() + i * nb; }
};

// Quantizes m rows of nb * 32 floats (rows ldx floats apart), rows split over threads.
Q8Rows quantize_rows_q8_32(const float* x, int64_t ldx, int64_t m, int64_t nb);

}  // namespace pyserve::cpu::quant
