// Small AVX2 helpers for the CPU kernels: fp32/fp16/bf16 loads into fp32
// lanes, a horizontal sum and a vector exp. Everything has a scalar twin for
// the scalar variant. Only for the sources compiled once per ISA variant
// (cmake/cpu_isa.cmake): the helpers live in that variant's namespace, so
// the linker cannot swap one variant's copy of an inline function for
// another's (an AVX2 `dot` called from the scalar kernels).
#pragma once

#ifndef PYSERVE_CPU_CAPABILITY
#error "cpu/vec.h is for sources in PYSERVE_CPU_KERNEL_SOURCES (compiled once per ISA variant; see cmake/cpu_isa.cmake)"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PYSERVE_HAVE_AVX2 1
#endif

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY {

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }

#ifdef PYSERVE_HAVE_AVX2

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: widen to 32 bits and shift into place.
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline float hmax(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_max_ps(lo, hi);
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// exp(x) for 8 lanes: range reduction x = n ln2 + r, |r| <= ln2/2, then a
// degree-6 polynomial for e^r (relative error ~2 ulp). Inputs below -87.3
// flush to 0, above 88.7 saturate to +inf.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7f), lo = _mm256_set1_ps(-87.3f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
  r = _mm256_fnmadd_ps(n, ln2_lo, r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
  return _mm256_andnot_ps(underflow, result);
}

// tanh(x) for 8 lanes, relative error a few ulp. |x| < 0.4: the odd Taylor
// polynomial to x^11 (next term < 3e-8 relative); else 1 - 2 / (exp(2|x|) + 1),
// which has no cancellation there and saturates to 1 once exp8 does. The sign
// is put back at the end, so tanh(-x) == -tanh(x) exactly.
inline __m256 tanh8(__m256 x) {
  const __m256 sign_mask = _mm256_set1_ps(-0.f);
  const __m256 a = _mm256_andnot_ps(sign_mask, x);
  const __m256 one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f);
  const __m256 big = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_mul_ps(two, a)), one)));
  const __m256 a2 = _mm256_mul_ps(a, a);
  __m256 p = _mm256_set1_ps(-1382.f / 155925.f);
  p = _mm256_fmadd_ps(p, a2, _mm256_set1_ps(62.f / 2835.f));
  p = _mm256_fmadd_ps(p, a2, _mm256_set1_ps(-17.f / 315.f));
  p = _mm256_fmadd_ps(p, a2, _mm256_set1_ps(2.f / 15.f));
  p = _mm256_fmadd_ps(p, a2, _mm256_set1_ps(-1.f / 3.f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, a2), a, a);
  const __m256 t = _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.4f), _CMP_LT_OQ));
  return _mm256_or_ps(t, _mm256_and_ps(sign_mask, x));
}

#endif  // PYSERVE_HAVE_AVX2

// x[i] = cap * tanh(x[i] / cap) for n values (attention logit soft-capping).
inline void soft_cap_inplace(float* x, int64_t n, float cap) {
  const float inv = 1.f / cap;
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 cv = _mm256_set1_ps(cap), iv = _mm256_set1_ps(inv);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(cv, tanh8(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv))));
#endif
  for (; i < n; ++i) x[i] = cap * std::tanh(x[i] * inv);
}

// Hint the cache to start loading [p, p + bytes).
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
}

// out[i] = exp(in[i]) for n values.
inline void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

// max of x[0..n), n >= 1.
inline float max_of(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -std::numeric_limits<float>::infinity();
#ifdef PYSERVE_HAVE_AVX2
  if (n >= 8) {
    __m256 mv = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
    m = hmax(mv);
  }
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x[i] = exp(x[i] - shift) for i < n; returns the sum of the new values.
inline float exp_shifted_sum(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 sv = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sv));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// sum_i a[i] * float(b[i]) for d values (d a multiple of 8 on the AVX2 path).
template <typename T>
inline float dot(const float* a, const T* b, int64_t d) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef PYSERVE_HAVE_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  sum = hsum(acc);
#endif
  for (; i < d; ++i) sum += a[i] * to_float(b[i]);
  return sum;
}

// acc[i] = acc[i] * alpha for d values.
inline void scale_inplace(float* acc, float alpha, int64_t d) {
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 a = _mm256_set1_ps(alpha);
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(acc + i, _mm256_mul_ps(_mm256_loadu_ps(acc + i), a));
#endif
  for (; i < d; ++i) acc[i] *= alpha;
}

// acc[i] += w * float(x[i]) for d values.
template <typename T>
inline void axpy(float* acc, float w, const T* x, int64_t d) {
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 wv = _mm256_set1_ps(w);
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(wv, load8(x + i), _mm256_loadu_ps(acc + i)));
#endif
  for (; i < d; ++i) acc[i] += w * to_float(x[i]);
}

#ifdef PYSERVE_HAVE_AVX2
// Lane j of the result = sum of the 8 lanes of v[j]: eight horizontal sums
// for the price of seven hadds and one cross-lane add.
inline __m256 transpose_sum8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6,
                             __m256 v7) {
  const __m256 s01 = _mm256_hadd_ps(v0, v1), s23 = _mm256_hadd_ps(v2, v3);
  const __m256 s45 = _mm256_hadd_ps(v4, v5), s67 = _mm256_hadd_ps(v6, v7);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // s0123 = [v0 v1 v2 v3 | v0 v1 v2 v3] (low/high 128-bit halves); same for s4567.
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}
#endif

// out[j] = dot(q, rows + j * row_stride) for j < n, d values each. Eight rows
// at a time keep eight independent FMA chains in flight and share one
// transposed horizontal sum.
template <typename T>
inline void dot_rows(const float* q, const T* rows, int64_t row_stride, int64_t n, int64_t d, float* out) {
  int64_t j = 0;
#ifdef PYSERVE_HAVE_AVX2
  if (d % 8 == 0) {
    for (; j + 8 <= n; j += 8) {
      const T* r = rows + j * row_stride;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, load8(r + i), a0);
        a1 = _mm256_fmadd_ps(qv, load8(r + row_stride + i), a1);
        a2 = _mm256_fmadd_ps(qv, load8(r + 2 * row_stride + i), a2);
        a3 = _mm256_fmadd_ps(qv, load8(r + 3 * row_stride + i), a3);
        a4 = _mm256_fmadd_ps(qv, load8(r + 4 * row_stride + i), a4);
        a5 = _mm256_fmadd_ps(qv, load8(r + 5 * row_stride + i), a5);
        a6 = _mm256_fmadd_ps(qv, load8(r + 6 * row_stride + i), a6);
        a7 = _mm256_fmadd_ps(qv, load8(r + 7 * row_stride + i), a7);
      }
      _mm256_storeu_ps(out + j, transpose_sum8(a0, a1, a2, a3, a4, a5, a6, a7));
    }
  }
#endif
  for (; j < n; ++j) out[j] = dot(q, rows + j * row_stride, d);
}

// acc = acc * alpha + sum_j w[j] * rows[j], d values. acc stays in registers
// across the rows, four 8-lane chunks at a time.
template <typename T>
inline void rescale_accumulate(float* acc, float alpha, const float* w, const T* rows, int64_t row_stride,
                               int64_t n, int64_t d) {
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 av = _mm256_set1_ps(alpha);
  for (; i + 32 <= d; i += 32) {
    __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + i), av);
    __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(acc + i + 8), av);
    __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(acc + i + 16), av);
    __m256 a3 = _mm256_mul_ps(_mm256_loadu_ps(acc + i + 24), av);
    const T* r = rows + i;
    for (int64_t j = 0; j < n; ++j, r += row_stride) {
      const __m256 wv = _mm256_set1_ps(w[j]);
      a0 = _mm256_fmadd_ps(wv, load8(r), a0);
      a1 = _mm256_fmadd_ps(wv, load8(r + 8), a1);
      a2 = _mm256_fmadd_ps(wv, load8(r + 16), a2);
      a3 = _mm256_fmadd_ps(wv, load8(r + 24), a3);
    }
    _mm256_storeu_ps(acc + i, a0);
    _mm256_storeu_ps(acc + i + 8, a1);
    _mm256_storeu_ps(acc + i + 16, a2);
    _mm256_storeu_ps(acc + i + 24, a3);
  }
  for (; i + 8 <= d; i += 8) {
    __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + i), av);
    const T* r = rows + i;
    for (int64_t j = 0; j < n; ++j, r += row_stride) a0 = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), load8(r), a0);
    _mm256_storeu_ps(acc + i, a0);
  }
#endif
  for (; i < d; ++i) {
    float a = acc[i] * alpha;
    for (int64_t j = 0; j < n; ++j) a += w[j] * to_float(rows[j * row_stride + i]);
    acc[i] = a;
  }
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY
