// Per-row int8 quantization of the activations (see activations.h). The SIMD
// and scalar paths round the same products the same way (x * id, then
// round-half-to-even: cvtps2dq under the default MXCSR, std::nearbyint under
// the default rounding mode), so every build gets the same q, d and s.
#include "cpu/quant/activations.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu/quant/simd.h"

namespace pyserve::cpu::quant {
namespace {

void quantize_row(const float* x, int64_t nb, int8_t* q, float* d, int32_t* s) {
  for (int64_t b = 0; b < nb; ++b, x += 32, q += 32) {
#if defined(PYSERVE_QUANT_VNNI) || defined(PYSERVE_QUANT_AVX2)
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
    const __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
    const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    const float amax = hmax8(a);
    const float db = amax / 127.f;
    const float id = db != 0.f ? 1.f / db : 0.f;
    const __m256 idv = _mm256_set1_ps(id);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, idv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, idv));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, idv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, idv));
    s[b] = hsum8_epi32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    // packs works within 128-bit lanes: dwords come out as i0 i1 i2 i3 (low
    // halves) then the high halves; the permute restores element order.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    d[b] = db;
#else
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float db = amax / 127.f;
    const float id = db != 0.f ? 1.f / db : 0.f;
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(x[j] * id));
      q[j] = static_cast<int8_t>(v);
      sum += v;
    }
    s[b] = sum;
    d[b] = db;
#endif
  }
}

}  // namespace

Q8Rows quantize_rows_q8_32(const float* x, int64_t ldx, int64_t m, int64_t nb) {
  Q8Rows r;
  r.m = m;
  r.nb = nb;
  r.q.reset(new int8_t[std::max<int64_t>(1, m * nb * 32)]);
  r.d.reset(new float[std::max<int64_t>(1, m * nb)]);
  r.s.reset(new int32_t[std::max<int64_t>(1, m * nb)]);
  // ~1 ns per value: below ~32k values a thread wake-up costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, nb * 32));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_row(x + i * ldx, nb, r.q.get() + i * nb * 32, r.d.get() + i * nb, r.s.get() + i * nb);
  });
  return r;
}

}  // namespace pyserve::cpu::quant
