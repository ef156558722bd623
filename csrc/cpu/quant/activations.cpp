// Per-row int8 quantization of the activations (see activations.h). The SIMD
// and scalar paths round the same products the same way (x * id, then
// round-half-to-even: cvtps2dq under the default MXCSR, std::nearbyint under
// the default rounding mode), so every build gets the same q, d and s.
#include "cpu/quant/activations.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/quant/simd.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {
namespace {

// One row: k values in blocks of `block`; s gets one sum per `group` values.
void quantize_row(const float* x, int64_t k, int64_t block, int64_t group, int8_t* q, float* d, int32_t* s) {
  for (int64_t b0 = 0; b0 < k; b0 += block) {
    const float* xb = x + b0;
#if defined(PYSERVE_QUANT_VNNI) || defined(PYSERVE_QUANT_AVX2)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 a = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int64_t j = 0; j < block; j += 8) {
      const __m256 v = _mm256_loadu_ps(xb + j);
      a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    const float amax = hmax8(a);
    const bool has_nan = _mm256_movemask_ps(nan) != 0;
#else
    float amax = 0.f;
    bool has_nan = false;
    for (int64_t j = 0; j < block; ++j) {
      amax = std::max(amax, std::fabs(xb[j]));
      has_nan = has_nan || std::isnan(xb[j]);
    }
#endif
    if (has_nan || !std::isfinite(amax)) {
      // max would lose a NaN, and a NaN or infinite x * id has no integer
      // value: the block becomes q = 0 with a NaN scale, which carries NaN to
      // every output of the row (the same on every path).
      d[b0 / block] = std::numeric_limits<float>::quiet_NaN();
      std::memset(q + b0, 0, block);
      for (int64_t g = b0 / group; g < (b0 + block) / group; ++g) s[g] = 0;
      continue;
    }
    const float db = amax / 127.f;
    const float id = db != 0.f ? 1.f / db : 0.f;
    d[b0 / block] = db;
    for (int64_t j = 0; j < block; j += 32) {
      const float* xv = xb + j;
      int8_t* qv = q + b0 + j;
      int32_t lo, hi;  // sums of the 32 values' two halves
#if defined(PYSERVE_QUANT_VNNI) || defined(PYSERVE_QUANT_AVX2)
      const __m256 idv = _mm256_set1_ps(id);
      const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xv), idv));
      const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xv + 8), idv));
      const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xv + 16), idv));
      const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xv + 24), idv));
      lo = hsum8_epi32(_mm256_add_epi32(i0, i1));
      hi = hsum8_epi32(_mm256_add_epi32(i2, i3));
      // packs works within 128-bit lanes: dwords come out as i0 i1 i2 i3 (low
      // halves) then the high halves; the permute restores element order.
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qv),
                          _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
      lo = hi = 0;
      for (int e = 0; e < 32; ++e) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(xv[e] * id));
        qv[e] = static_cast<int8_t>(v);
        (e < 16 ? lo : hi) += v;
      }
#endif
      if (group == 32) {
        s[(b0 + j) / 32] = lo + hi;
      } else {
        s[(b0 + j) / 16] = lo;
        s[(b0 + j) / 16 + 1] = hi;
      }
    }
  }
}

}  // namespace

Q8Rows quantize_rows_q8(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t block, int64_t group) {
  Q8Rows r;
  r.m = m;
  r.k = k;
  r.nb = k / block;
  r.block = block;
  r.group = group;
  r.q.reset(new int8_t[std::max<int64_t>(1, m * k)]);
  r.d.reset(new float[std::max<int64_t>(1, m * r.nb)]);
  r.ns = k / group;
  r.s.reset(new int32_t[std::max<int64_t>(1, m * r.ns)]);
  r.s16.reset(new int16_t[std::max<int64_t>(1, m * r.ns)]);
  if (group == block) r.ds.reset(new float[std::max<int64_t>(1, m * r.nb)]);
  // ~1 ns per value: below ~32k values a thread wake-up costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      quantize_row(x + i * ldx, k, block, group, r.q.get() + i * k, r.d.get() + i * r.nb, r.s.get() + i * r.ns);
      for (int64_t g = 0; g < r.ns; ++g) r.s16[i * r.ns + g] = static_cast<int16_t>(r.s[i * r.ns + g]);
      if (r.ds) {
        for (int64_t b = 0; b < r.nb; ++b)
          r.ds[i * r.nb + b] = r.d[i * r.nb + b] * static_cast<float>(r.s[i * r.nb + b]);
      }
    }
  });
  return r;
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
