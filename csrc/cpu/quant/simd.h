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

#if defined(PYSERVE_QUANT_VNNI)
// The AVX-512 kernels read two neighbouring tiles at once: x's bytes in the
// low half of a vector, y's (the next tile's, same offset) in the high half.
// 32 bytes of each -> one 512-bit vector.
inline __m512i two_tiles32(const uint8_t* x, const uint8_t* y) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y)), 1);
}

// 8 fp16 of each tile -> 16 fp32 lanes.
inline __m512 two_tiles_fp16(const uint8_t* x, const uint8_t* y) {
  return _mm512_cvtph_ps(_mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(y)), 1));
}

// Two rows of 8 bytes per tile (x[0..8) and x[8..16), e.g. a scale of sub-
// blocks 2p and 2p + 1 for each of 8 columns) as 16 lanes of int16 pairs
// (x[r], x[8 + r]), the operand vpdpwssd multiplies; kSigned: int8 bytes.
template <bool kSigned>
inline __m512i two_tiles_byte_pairs(const uint8_t* x, const uint8_t* y) {
  const __m128i lx = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  const __m128i ly = _mm_loadu_si128(reinterpret_cast<const __m128i*>(y));
  const __m256i pairs = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(lx, _mm_srli_si128(lx, 8))),
                                                _mm_unpacklo_epi8(ly, _mm_srli_si128(ly, 8)), 1);
  return kSigned ? _mm512_cvtepi8_epi16(pairs) : _mm512_cvtepu8_epi16(pairs);
}
#endif

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
