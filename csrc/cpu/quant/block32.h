// The machinery shared by the formats of 32-weight blocks with one fp16 scale
// (and optionally one fp16 min): Q8_0, Q4_0, Q4_1, and Q5_0/Q5_1 stored one
// quant per byte (q5_0.cpp). A
// format file describes its GGUF block with a small struct F and gets its
// QuantFormat from make_block32_format<F>():
//
//   struct F {
//     static constexpr int64_t kType, kBlockBytes; static constexpr const char* kName;
//     static constexpr bool kNibbles;  // quants stored as 4-bit (else one per byte)
//     static constexpr int kOffset;    // weight = d * (u - kOffset) [+ m], u unsigned
//     static constexpr bool kHasMin;   // the block carries m
//     // GGUF block -> its 32 unsigned quants u and the raw fp16 d (and m).
//     static void unpack(const uint8_t* block, uint8_t u[32], uint16_t* d, uint16_t* m);
//     // ggml's quantize_row_*_ref for one block (32 floats -> kBlockBytes).
//     static void quantize_block(const float* x, uint8_t* block);
//   };
//
// Packed tile block (kTileRows = 8 GGUF rows, one block of each):
//   fp16 d[8]; fp16 m[8] (kHasMin only); uint8 qs[]
//   8-bit: qs[(g * 8 + r) * 4 + i] = u_r[4g + i],                        g < 8
//   4-bit: qs[(g * 8 + r) * 4 + i] = u_r[4g + i] | u_r[16 + 4g + i] << 4, g < 4
// so one 32-byte load holds 4 consecutive quants of each of the 8 rows: a
// vpdpbusd with those 4 activations broadcast to every lane adds them into
// each row's own int32 lane (llama.cpp's repack and ik_llama.cpp's _R8 types
// interleave the same way). With 4-bit quants the low nibbles pair with
// activations 4g..4g+3 and the high nibbles with 16+4g..16+4g+3: that is
// GGUF's own nibble order, so 4-bit packing only moves 4-byte groups.
//
// Result of row i, column j (every path, every build):
//   acc = 0; for each block b in order:
//     acc = fma(d_w[j,b] * d_a[i,b], float(sum_k (u[j,b,k] - kOffset) * q_a[i,b,k]), acc)
//     kHasMin: acc = fma(m_w[j,b], d_a[i,b] * float(s_a[i,b]), acc)
//   y[i, j] = acc (+ bias[j])
// The integer dot product is exact and each lane is one column, so the result
// is independent of the batch, of the thread split and of the ISA.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/quant/activations.h"
#include "cpu/quant/driver.h"
#include "cpu/quant/format.h"
#include "cpu/quant/simd.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {

inline float half_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }
inline uint16_t float_to_half(float x) { return c10::Half(x).x; }

// The block's value of largest magnitude, with its sign (the first one on
// ties), as ggml's symmetric reference quantizers (Q4_0, Q5_0) pick it.
inline float signed_absmax32(const float* x) {
  float amax = 0.f, max = 0.f;
  for (int j = 0; j < 32; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  return max;
}

// The block's min and max, as ggml's reference quantizers with a min (Q4_1, Q5_1) find them.
inline void min_max32(const float* x, float* min, float* max) {
  *min = FLT_MAX;
  *max = -FLT_MAX;
  for (int j = 0; j < 32; ++j) {
    if (x[j] < *min) *min = x[j];
    if (x[j] > *max) *max = x[j];
  }
}

template <class F>
struct Block32 {
  static constexpr int64_t kScaleBytes = F::kHasMin ? 32 : 16;
  static constexpr int64_t kQsBytes = F::kNibbles ? 128 : 256;
  static constexpr int64_t kTileBlockBytes = kScaleBytes + kQsBytes;

  // Unsigned quant of row r, element e (< 32) in a packed tile block's qs.
  static int u_at(const uint8_t* qs, int64_t r, int e) {
    if constexpr (F::kNibbles) {
      const int lo = e < 16 ? e : e - 16;
      const uint8_t byte = qs[((lo / 4) * kTileRows + r) * 4 + lo % 4];
      return e < 16 ? (byte & 15) : (byte >> 4);
    } else {
      return qs[((e / 4) * kTileRows + r) * 4 + e % 4];
    }
  }

  static void pack_tile(const uint8_t* rows, int64_t row_stride, int64_t nrows, int64_t nb, uint8_t* tile) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* o = tile + b * kTileBlockBytes;
      uint16_t d[kTileRows] = {}, m[kTileRows] = {};
      uint8_t u[kTileRows][32];
      std::memset(u, F::kOffset, sizeof(u));  // padding rows: every weight 0
      for (int64_t r = 0; r < nrows; ++r) F::unpack(rows + r * row_stride + b * F::kBlockBytes, u[r], &d[r], &m[r]);
      std::memcpy(o, d, sizeof(d));
      if constexpr (F::kHasMin) std::memcpy(o + 16, m, sizeof(m));
      uint8_t* qs = o + kScaleBytes;
      for (int g = 0; g < (F::kNibbles ? 4 : 8); ++g)
        for (int64_t r = 0; r < kTileRows; ++r)
          for (int i = 0; i < 4; ++i) {
            uint8_t v = u[r][4 * g + i];
            if constexpr (F::kNibbles) v = static_cast<uint8_t>(v | (u[r][16 + 4 * g + i] << 4));
            qs[(g * kTileRows + r) * 4 + i] = v;
          }
    }
  }

  // Same products and sums as gguf's dequantize_blocks: d * (u - offset) [+ m].
  static void dequant_row(const uint8_t* tile, int64_t r, int64_t nb, float* out) {
    for (int64_t b = 0; b < nb; ++b, out += 32) {
      const uint8_t* o = tile + b * kTileBlockBytes;
      uint16_t bits;
      std::memcpy(&bits, o + 2 * r, 2);
      const float d = half_to_float(bits);
      float m = 0.f;
      if constexpr (F::kHasMin) {
        std::memcpy(&bits, o + 16 + 2 * r, 2);
        m = half_to_float(bits);
      }
      for (int e = 0; e < 32; ++e) {
        float v = d * static_cast<float>(u_at(o + kScaleBytes, r, e) - F::kOffset);
        if constexpr (F::kHasMin) v = v + m;
        out[e] = v;
      }
    }
  }

  static void quantize_row(const float* x, int64_t nb, uint8_t* out) {
    for (int64_t b = 0; b < nb; ++b) F::quantize_block(x + 32 * b, out + b * F::kBlockBytes);
  }

#if defined(PYSERVE_QUANT_VNNI)
  // Two tiles side by side (16 columns, tile a in lanes 0-7, tile b in 8-15),
  // R activation rows; res[r][16].
  template <int R>
  static void tiles2(const Q8Rows& a, int64_t i0, const uint8_t* ta, const uint8_t* tb, float* res) {
    const int64_t nb = a.nb;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    // Each row's activations, scales and sums (d * s with a min), found once.
    const int8_t* qr[R];
    const float *dr[R], *dsr[R];
    const int32_t* sr[R];
    for (int r = 0; r < R; ++r) {
      qr[r] = a.row_q(i0 + r);
      dr[r] = a.row_d(i0 + r);
      sr[r] = a.row_s(i0 + r);
      dsr[r] = F::kHasMin ? a.row_ds(i0 + r) : nullptr;
    }
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* pa = ta + b * kTileBlockBytes;
      const uint8_t* pb = tb + b * kTileBlockBytes;
      if (a.m <= kMaxRows) prefetch_ahead<kTileBlockBytes>(pa, pb, b, nb);  // driver.h
      const __m512 dw = two_tiles_fp16(pa, pb);
      __m512 mw = _mm512_setzero_ps();
      if constexpr (F::kHasMin) mw = two_tiles_fp16(pa + 16, pb + 16);
      __m512i w[8];
      if constexpr (F::kNibbles) {
        for (int g = 0; g < 4; ++g) {
          const __m512i raw = two_tiles32(pa + kScaleBytes + 32 * g, pb + kScaleBytes + 32 * g);
          w[g] = _mm512_and_si512(raw, low4);
          w[4 + g] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
        }
      } else {
        for (int g = 0; g < 8; ++g) w[g] = two_tiles32(pa + kScaleBytes + 32 * g, pb + kScaleBytes + 32 * g);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* q = qr[r] + 32 * b;
        const __m512i s0 = _mm512_set1_epi32(-F::kOffset * sr[r][b]);  // the u - kOffset correction
        __m512i dot;
        if constexpr (R >= 4) {
          // One chain per row: the R rows' chains are independent work enough.
          dot = s0;
          for (int g = 0; g < 8; ++g) dot = _mm512_dpbusd_epi32(dot, w[g], _mm512_set1_epi32(load_i32(q + 4 * g)));
        } else {
          // Few rows: two chains, half the dependent latency.
          __m512i s1 = _mm512_setzero_si512(), s2 = s0;
          for (int g = 0; g < 8; g += 2) {
            s2 = _mm512_dpbusd_epi32(s2, w[g], _mm512_set1_epi32(load_i32(q + 4 * g)));
            s1 = _mm512_dpbusd_epi32(s1, w[g + 1], _mm512_set1_epi32(load_i32(q + 4 * g + 4)));
          }
          dot = _mm512_add_epi32(s2, s1);
        }
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(dr[r][b])), _mm512_cvtepi32_ps(dot), acc[r]);
        if constexpr (F::kHasMin) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dsr[r][b]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(res + 16 * r, acc[r]);
  }
#elif defined(PYSERVE_QUANT_AVX2)
  // One tile (8 columns), R activation rows; res[r][8].
  template <int R>
  static void tile1(const Q8Rows& a, int64_t i0, const uint8_t* t, float* res) {
    const int64_t nb = a.nb;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones16 = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = t + b * kTileBlockBytes;
      // No software prefetch on this path: with one tile per call the hardware
      // prefetcher alone streamed faster (bench_quant_linear, avx2 variant, m = 1:
      // big Q4_1 560 us without, 671 us with prefetcht1 4 KiB ahead).
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      __m256 mw = _mm256_setzero_ps();
      if constexpr (F::kHasMin) mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
      __m256i w[8];
      const __m256i* qs = reinterpret_cast<const __m256i*>(p + kScaleBytes);
      if constexpr (F::kNibbles) {
        for (int g = 0; g < 4; ++g) {
          const __m256i raw = _mm256_loadu_si256(qs + g);
          w[g] = _mm256_and_si256(raw, low4);
          w[4 + g] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        }
      } else if constexpr (F::kOffset == 128) {
        // u - 128 as int8: maddubs needs one unsigned operand, so it takes |w|
        // and the activations carry w's sign (|w| * |q_a| * 2 <= 32512: no saturation).
        for (int g = 0; g < 8; ++g) w[g] = _mm256_xor_si256(_mm256_loadu_si256(qs + g), _mm256_set1_epi8(char(0x80)));
      } else {
        for (int g = 0; g < 8; ++g) w[g] = _mm256_loadu_si256(qs + g);  // 5-bit u, unsigned as they are
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* q = a.row_q(i0 + r) + 32 * b;
        const int32_t s = a.row_s(i0 + r)[b];
        __m256i isum;
        if constexpr (F::kNibbles) {
          // 15 * 127 * 2 per pair, 8 pairs summed: <= 30480, fits int16.
          __m256i p16 = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(load_i32(q)));
          for (int g = 1; g < 8; ++g)
            p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(w[g], _mm256_set1_epi32(load_i32(q + 4 * g))));
          isum = _mm256_sub_epi32(_mm256_madd_epi16(p16, ones16), _mm256_set1_epi32(F::kOffset * s));
        } else if constexpr (F::kOffset == 128) {
          isum = _mm256_setzero_si256();
          for (int g = 0; g < 8; ++g) {
            const __m256i qa = _mm256_set1_epi32(load_i32(q + 4 * g));
            const __m256i p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(w[g]), _mm256_sign_epi8(qa, w[g]));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, ones16));
          }
        } else {
          // 5-bit u (Q5_0/Q5_1): a maddubs pair is <= 31 * 128 * 2 = 7936, so each
          // group is widened to int32 before the sum (8 groups could pass int16).
          isum = _mm256_set1_epi32(-F::kOffset * s);
          for (int g = 0; g < 8; ++g) {
            const __m256i p16 = _mm256_maddubs_epi16(w[g], _mm256_set1_epi32(load_i32(q + 4 * g)));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, ones16));
          }
        }
        const float da = a.row_d(i0 + r)[b];
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(da)), _mm256_cvtepi32_ps(isum), acc[r]);
        if constexpr (F::kHasMin) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(da * static_cast<float>(s)), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(res + 8 * r, acc[r]);
  }
#else
  // One tile (8 columns), R activation rows; res[r][8].
  template <int R>
  static void tile1(const Q8Rows& a, int64_t i0, const uint8_t* t, float* res) {
    float acc[R][kTileRows] = {};
    for (int64_t b = 0; b < a.nb; ++b) {
      const uint8_t* p = t + b * kTileBlockBytes;
      for (int64_t c = 0; c < kTileRows; ++c) {
        uint16_t bits;
        std::memcpy(&bits, p + 2 * c, 2);
        const float dw = half_to_float(bits);
        float mw = 0.f;
        if constexpr (F::kHasMin) {
          std::memcpy(&bits, p + 16 + 2 * c, 2);
          mw = half_to_float(bits);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* q = a.row_q(i0 + r) + 32 * b;
          int32_t isum = 0;
          for (int e = 0; e < 32; ++e) isum += (u_at(p + kScaleBytes, c, e) - F::kOffset) * q[e];
          const float da = a.row_d(i0 + r)[b];
          acc[r][c] = std::fma(dw * da, static_cast<float>(isum), acc[r][c]);
          if constexpr (F::kHasMin) acc[r][c] = std::fma(mw, da * static_cast<float>(a.row_s(i0 + r)[b]), acc[r][c]);
        }
      }
    }
    for (int r = 0; r < R; ++r) std::memcpy(res + kTileRows * r, acc[r], sizeof(acc[r]));
  }
#endif

#if defined(PYSERVE_QUANT_VNNI)
  static constexpr int64_t kUnitTiles = 2;  // tiles per kernel call
#else
  static constexpr int64_t kUnitTiles = 1;
#endif
  static constexpr int64_t kBlockElems = 32, kActBlock = 32, kActGroup = 32;

  template <int R>
  static void unit(const Q8Rows& a, int64_t i0, const uint8_t* t, int64_t tile_bytes, bool pair, float* res) {
#if defined(PYSERVE_QUANT_VNNI)
    // A lone last tile runs as its own pair (lanes 8-15 discarded): the same
    // per-lane arithmetic as any other tile.
    tiles2<R>(a, i0, t, pair ? t + tile_bytes : t, res);
#else
    (void)tile_bytes;
    (void)pair;
    tile1<R>(a, i0, t, res);
#endif
  }
};

template <class F>
constexpr QuantFormat make_block32_format() {
  using B = Block32<F>;
  return QuantFormat{F::kType, F::kName, 32, F::kBlockBytes, B::kTileBlockBytes, &B::pack_tile, &B::dequant_row,
                     &B::quantize_row, &run_linear<B>};
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
