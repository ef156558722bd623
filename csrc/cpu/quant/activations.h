// Activations of the quantized matmul: each row of x quantized to int8 in
// blocks of `block` values (32 for the block-32 formats, as ggml's Q8_0/Q8_1;
// 256 for the K-quants, as ggml's Q8_K), with an fp32 scale per block:
//   d = max|x| / 127, q = round_half_even(x * (1 / d)), |q| <= 127,
// and s = the sum of q over each `group` consecutive values (32: one per block,
// for Q4_0's -8, Q4_1's min and Q8_0 stored as unsigned q + 128; 16: the
// K-quants' sub-blocks).
#pragma once

#ifndef PYSERVE_CPU_CAPABILITY
#error "csrc/cpu/quant/ is compiled once per CPU ISA variant (PYSERVE_CPU_KERNEL_SOURCES, cmake/cpu_isa.cmake); baseline code reaches it through csrc/quant_ops.h"
#endif

#include <cstdint>
#include <memory>

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {

struct Q8Rows {
  int64_t m = 0, k = 0, nb = 0, block = 32, group = 32;
  int64_t ns = 0;                // k / group, kept so that row_s costs no division in a kernel's loop
  std::unique_ptr<int8_t[]> q;   // [m, k]
  std::unique_ptr<float[]> d;    // [m, k / block]
  std::unique_ptr<int32_t[]> s;  // [m, k / group]
  // [m, k / group] the same sums as int16 (|s| <= 32 * 127), so that a kernel
  // broadcasts two neighbouring ones as the int16 pair vpdpwssd multiplies.
  std::unique_ptr<int16_t[]> s16;
  // [m, k / block] d * float(s) when group == block (else empty): the fp32
  // product a block-32 kernel with a min would otherwise form per output
  // tile (the same rounding either way: one fp32 multiply of the same values).
  std::unique_ptr<float[]> ds;

  const int8_t* row_q(int64_t i) const { return q.get() + i * k; }
  const float* row_d(int64_t i) const { return d.get() + i * nb; }
  const int32_t* row_s(int64_t i) const { return s.get() + i * ns; }
  const int16_t* row_s16(int64_t i) const { return s16.get() + i * ns; }
  const float* row_ds(int64_t i) const { return ds.get() + i * nb; }
};

// Quantizes m rows of k floats (rows ldx floats apart; k a multiple of block;
// block a multiple of 32; group 16 or 32), rows split over threads.
Q8Rows quantize_rows_q8(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t block, int64_t group);

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
