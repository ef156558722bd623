// Small AVX2 helpers for the CPU kernels: fp32/fp16/bf16 loads into fp32
// lanes, a horizontal sum and a vector exp. Everything has a scalar twin so
// the kernels also build for PYSERVE_CPU_ISA=scalar.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PYSERVE_HAVE_AVX2 1
#endif

namespace pyserve::cpu {

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

#endif  // PYSERVE_HAVE_AVX2

// out[i] = exp(in[i]) for n values.
inline void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i]);
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

// out[j] = dot(q, rows + j * row_stride) for j < n, d values each. Four rows
// at a time keep four independent FMA chains in flight instead of one
// latency-bound chain per dot product.
template <typename T>
inline void dot_rows(const float* q, const T* rows, int64_t row_stride, int64_t n, int64_t d, float* out) {
  int64_t j = 0;
#ifdef PYSERVE_HAVE_AVX2
  for (; j + 4 <= n; j += 4) {
    const T* r0 = rows + j * row_stride;
    const T* r1 = r0 + row_stride;
    const T* r2 = r1 + row_stride;
    const T* r3 = r2 + row_stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      a0 = _mm256_fmadd_ps(qv, load8(r0 + i), a0);
      a1 = _mm256_fmadd_ps(qv, load8(r1 + i), a1);
      a2 = _mm256_fmadd_ps(qv, load8(r2 + i), a2);
      a3 = _mm256_fmadd_ps(qv, load8(r3 + i), a3);
    }
    out[j] = hsum(a0);
    out[j + 1] = hsum(a1);
    out[j + 2] = hsum(a2);
    out[j + 3] = hsum(a3);
    for (; i < d; ++i) {
      out[j] += q[i] * to_float(r0[i]);
      out[j + 1] += q[i] * to_float(r1[i]);
      out[j + 2] += q[i] * to_float(r2[i]);
      out[j + 3] += q[i] * to_float(r3[i]);
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

}  // namespace pyserve::cpu
