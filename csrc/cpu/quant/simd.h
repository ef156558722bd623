// Which int8 dot-product path the quantized kernels take, chosen by the ISA
// variant this file is being compiled for (cmake/cpu_isa.cmake compiles
// csrc/cpu/quant/ once per variant; the active one runs):
//   PYSERVE_QUANT_VNNI  AVX-512 VNNI: vpdpbusd on 512-bit vectors (two tiles)
//                       -- the avx512_vnni variant
//   PYSERVE_QUANT_AVX2  AVX2: vpmaddubsw + vpmaddwd on 256-bit vectors (one
//                       tile) -- the avx2 and avx512 variants
//   neither             portable scalar C++ -- the scalar variant
// Every path computes the same integers and the same fp32 operations in the
// same order, so their results are bit-identical (tests/kernels/test_cpu_isa.py
// compares the variants).
#pragma once

#ifndef PYSERVE_CPU_CAPABILITY
#error "csrc/cpu/quant/ is compiled once per CPU ISA variant (PYSERVE_CPU_KERNEL_SOURCES, cmake/cpu_isa.cmake); baseline code reaches it through csrc/quant_ops.h"
#endif

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PYSERVE_QUANT_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PYSERVE_QUANT_AVX2 1
#endif

#if defined(PYSERVE_QUANT_VNNI) || defined(PYSERVE_QUANT_AVX2)
#include <immintrin.h>
#endif

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(PYSERVE_QUANT_VNNI) || defined(PYSERVE_QUANT_AVX2)
inline float hmax8(__m256 v) {
  __m128 lo = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline int32_t hsum8_epi32(__m256i v) {
  __m128i lo = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  lo = _mm_add_epi32(lo, _mm_unpackhi_epi64(lo, lo));
  lo = _mm_add_epi32(lo, _mm_shuffle_epi32(lo, 1));
  return _mm_cvtsi128_si32(lo);
}
#endif

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
