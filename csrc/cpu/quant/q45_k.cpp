// Q4_K (ggml type 12) and Q5_K (13): super-blocks of 256 weights in 8
// sub-blocks of 32, each with a 6-bit scale sc and a 6-bit min m (packed in
// 12 bytes), plus fp16 d and dmin per super-block; quants u of 4 bits (Q4_K)
// or 5 (Q5_K: a fifth bit plane qh); weight = (d * sc[j]) * u - (dmin * m[j]).
// One file for the two: they differ only by the fifth bit. Activations:
// blocks of 256 with a sum per 32 (a sub-block: what the mins multiply).
//
// Packed tile block (8 rows, one super-block of each): the 6-bit scales and
// mins unpacked to bytes (4 bytes per row more than GGUF's 12, +3%):
//   fp16 d[8] at 0, fp16 dmin[8] at 16, uint8 sc[8][8] at 32, uint8 m[8][8] at
//   96 (sub-block major), then sub-block j at lo_off(j): its 32 weights as a
//   block-32 4-bit tile block (block32.h), 128 bytes; Q5_K: followed by its
//   fifth bits, 32 bytes, byte r * 4 + i: bit g = weight 4g + i, bit 4 + g =
//   weight 16 + 4g + i (g < 4). A sub-block's planes sit together so that the
//   kernels read a tile block front to back (as Q6_K, q6_k.cpp).
//
// Result of row i, column j (every path): for each super-block b in order,
//   isum = sum_j sc[j] * sum_{k in j} u_k q_k,  msum = sum_j m[j] * s_a[j]   (exact int32;
//   s_a[j]: the sum of the activations' sub-block j, |s_a| <= 32 * 127, an int16)
//   acc = fma(d_w * d_a, float(isum), acc); acc = fma(-(dmin_w * d_a), float(msum), acc).
#include <cstring>

#include "cpu/quant/block32.h"
#include "cpu/quant/driver.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {
namespace {

constexpr int64_t kScOff = 32, kMnOff = 96;

template <bool kFive>
struct QK45 {
  // Sub-block j's low nibbles (128 bytes), then, for Q5_K, its fifth bits
  // (32): the kernels read a tile block front to back, one stream.
  static constexpr int64_t lo_off(int64_t j) { return 160 + (kFive ? 160 : 128) * j; }
  static constexpr int64_t hi_off(int64_t j) { return lo_off(j) + 128; }

  static constexpr int64_t kBlockBytes = kFive ? 176 : 144;  // d, dmin, scales[12], [qh[32]], qs[128]
  static constexpr int64_t kTileBlockBytes = kFive ? 1440 : 1184;
  static constexpr int64_t kBlockElems = 256, kActBlock = 256, kActGroup = 32;

  // GGUF block -> u[256], sc[8], m[8], raw fp16 d and dmin (ggml's
  // dequantize_row_q4_K / q5_K element order and get_scale_min_k4).
  static void unpack(const uint8_t* blk, uint8_t u[256], uint8_t sc[8], uint8_t mn[8], uint16_t* d, uint16_t* dmin) {
    std::memcpy(d, blk, 2);
    std::memcpy(dmin, blk + 2, 2);
    const uint8_t* s = blk + 4;
    for (int j = 0; j < 8; ++j) {
      if (j < 4) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
      } else {
        sc[j] = static_cast<uint8_t>((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        mn[j] = static_cast<uint8_t>((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
      }
    }
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + (kFive ? 48 : 16);
    for (int j = 0; j < 8; ++j) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t byte = qs[32 * (j / 2) + l];
        uint8_t v = (j % 2 == 0) ? (byte & 15) : (byte >> 4);
        if constexpr (kFive) v = static_cast<uint8_t>(v | (((qh[l] >> j) & 1) << 4));
        u[32 * j + l] = v;
      }
    }
  }

  static void pack_tile(const uint8_t* rows, int64_t row_stride, int64_t nrows, int64_t nb, uint8_t* tile) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* o = tile + b * kTileBlockBytes;
      uint16_t d[kTileRows] = {}, dmin[kTileRows] = {};
      uint8_t sc[kTileRows][8] = {}, mn[kTileRows][8] = {};
      uint8_t u[kTileRows][256] = {};  // padding rows: d = dmin = 0
      for (int64_t r = 0; r < nrows; ++r)
        unpack(rows + r * row_stride + b * kBlockBytes, u[r], sc[r], mn[r], &d[r], &dmin[r]);
      std::memcpy(o, d, sizeof(d));
      std::memcpy(o + 16, dmin, sizeof(dmin));
      for (int j = 0; j < 8; ++j)
        for (int64_t r = 0; r < kTileRows; ++r) {
          o[kScOff + j * kTileRows + r] = sc[r][j];
          o[kMnOff + j * kTileRows + r] = mn[r][j];
        }
      for (int j = 0; j < 8; ++j)
        for (int64_t r = 0; r < kTileRows; ++r) {
          const uint8_t* ur = u[r] + 32 * j;
          for (int g = 0; g < 4; ++g)
            for (int i = 0; i < 4; ++i)
              o[lo_off(j) + (g * kTileRows + r) * 4 + i] =
                  static_cast<uint8_t>((ur[4 * g + i] & 15) | ((ur[16 + 4 * g + i] & 15) << 4));
          if constexpr (kFive) {
            for (int i = 0; i < 4; ++i) {
              uint8_t v = 0;
              for (int g = 0; g < 4; ++g)
                v = static_cast<uint8_t>(v | ((ur[4 * g + i] >> 4) << g) | ((ur[16 + 4 * g + i] >> 4) << (4 + g)));
              o[hi_off(j) + r * 4 + i] = v;
            }
          }
        }
    }
  }

  static int u_at(const uint8_t* o, int64_t r, int e) {
    const int j = e / 32, w = e % 32, h = w / 16, g = (w % 16) / 4, i = w % 4;
    const uint8_t lo = o[lo_off(j) + (g * kTileRows + r) * 4 + i];
    int v = (h == 0 ? lo : lo >> 4) & 15;
    if constexpr (kFive) v |= ((o[hi_off(j) + r * 4 + i] >> (4 * h + g)) & 1) << 4;
    return v;
  }

  // gguf's dequantize: (d * sc) * u - (dmin * m), each product rounded to fp32.
  static void dequant_row(const uint8_t* tile, int64_t r, int64_t nb, float* out) {
    for (int64_t b = 0; b < nb; ++b, out += 256) {
      const uint8_t* o = tile + b * kTileBlockBytes;
      uint16_t bits;
      std::memcpy(&bits, o + 2 * r, 2);
      const float d = half_to_float(bits);
      std::memcpy(&bits, o + 16 + 2 * r, 2);
      const float dmin = half_to_float(bits);
      for (int e = 0; e < 256; ++e) {
        const float dsc = d * static_cast<float>(o[kScOff + (e / 32) * kTileRows + r]);
        const float dm = dmin * static_cast<float>(o[kMnOff + (e / 32) * kTileRows + r]);
        out[e] = dsc * static_cast<float>(u_at(o, r, e)) - dm;
      }
    }
  }

#if defined(PYSERVE_QUANT_VNNI)
  static constexpr int64_t kUnitTiles = 2;

  static __m512i bytes16(const uint8_t* x, const uint8_t* y) {  // 8 uint8 of each tile -> 16 int32
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x)),
                                                   _mm_loadl_epi64(reinterpret_cast<const __m128i*>(y))));
  }
  // Sub-block j of the two tiles' blocks pa, pb: quants 4g..4g+3 of each lane
  // in wl[g], 16+4g.. in wh[g], as vpdpbusd's unsigned bytes.
  static inline __attribute__((always_inline)) void unpack_sub(const uint8_t* pa, const uint8_t* pb, int j,
                                                               __m512i wl[4], __m512i wh[4]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), bit4 = _mm512_set1_epi8(0x10);
    __m512i hb = _mm512_setzero_si512();
    if constexpr (kFive) hb = two_tiles32(pa + hi_off(j), pb + hi_off(j));
    for (int g = 0; g < 4; ++g) {
      const __m512i raw = two_tiles32(pa + lo_off(j) + 32 * g, pb + lo_off(j) + 32 * g);
      if constexpr (kFive) {
        // Fifth bits g and 4 + g moved to bit 4 by one 16-bit shift each
        // (none for 4 + g, g = 0) and masked; 0xCA = low4 ? x : y, a bit
        // select of the low nibble and that bit.
        const __m512i f0 = _mm512_and_si512(_mm512_slli_epi16(hb, 4 - g), bit4);
        const __m512i f1 = _mm512_and_si512(g == 0 ? hb : _mm512_srli_epi16(hb, g), bit4);
        wl[g] = _mm512_ternarylogic_epi32(low4, raw, f0, 0xCA);
        wh[g] = _mm512_ternarylogic_epi32(low4, _mm512_srli_epi16(raw, 4), f1, 0xCA);
      } else {
        wl[g] = _mm512_and_si512(raw, low4);
        wh[g] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      }
    }
  }

  // Many rows: a unit's super-blocks unpacked once (unpack) into the vectors
  // the kernel would otherwise rebuild for every 8 rows -- per sub-block j
  // wl[4], wh[4], sc at 9j; then the 4 min pairs, dw and dmw at 72 -- and
  // each group of rows then loads them (tiles2 with u). 5 KB per super-block.
  static constexpr int64_t kUnpackedVecs = 8 * 9 + 6;

  static void unpack(const uint8_t* ta, const uint8_t* tb, int64_t nb, __m512i* u) {
    for (int64_t b = 0; b < nb; ++b, u += kUnpackedVecs) {
      const uint8_t* pa = ta + b * kTileBlockBytes;
      const uint8_t* pb = tb + b * kTileBlockBytes;
      for (int j = 0; j < 8; ++j) {
        unpack_sub(pa, pb, j, u + 9 * j, u + 9 * j + 4);
        u[9 * j + 8] = bytes16(pa + kScOff + 8 * j, pb + kScOff + 8 * j);
      }
      for (int p = 0; p < 4; ++p) u[72 + p] = two_tiles_byte_pairs<false>(pa + kMnOff + 16 * p, pb + kMnOff + 16 * p);
      u[76] = _mm512_castps_si512(two_tiles_fp16(pa, pb));
      u[77] = _mm512_castps_si512(two_tiles_fp16(pa + 16, pb + 16));
    }
  }

  // Rows i0..i0+R-1 against two tiles (ta, tb), read from the packed weight
  // as it streams, or (kU) from unpack's vectors u.
  template <int R, bool kU>
  static void tiles2(const Q8Rows& a, int64_t i0, const uint8_t* ta, const uint8_t* tb, const __m512i* u,
                     float* res) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < a.nb; ++b) {
      const uint8_t* pa = kU ? nullptr : ta + b * kTileBlockBytes;
      const uint8_t* pb = kU ? nullptr : tb + b * kTileBlockBytes;
      const __m512i* ub = kU ? u + b * kUnpackedVecs : nullptr;
      if (!kU && a.m <= kMaxRows) prefetch_ahead<kTileBlockBytes>(pa, pb, b, a.nb);  // driver.h
      __m512i isum[R];
      for (int r = 0; r < R; ++r) isum[r] = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) {
        __m512i wl[4], wh[4], sc;
        if constexpr (kU) {
          for (int g = 0; g < 4; ++g) {
            wl[g] = _mm512_load_si512(ub + 9 * j + g);
            wh[g] = _mm512_load_si512(ub + 9 * j + 4 + g);
          }
          sc = _mm512_load_si512(ub + 9 * j + 8);
        } else {
          unpack_sub(pa, pb, j, wl, wh);
          sc = bytes16(pa + kScOff + 8 * j, pb + kScOff + 8 * j);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* q = a.row_q(i0 + r) + 256 * b + 32 * j;
          __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
          for (int g = 0; g < 4; ++g) {
            d0 = _mm512_dpbusd_epi32(d0, wl[g], _mm512_set1_epi32(load_i32(q + 4 * g)));
            d1 = _mm512_dpbusd_epi32(d1, wh[g], _mm512_set1_epi32(load_i32(q + 16 + 4 * g)));
          }
          isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(_mm512_add_epi32(d0, d1), sc));
        }
      }
      // The mins once per super-block: 4 int16 pair products per lane and row
      // (m <= 63, |s_a| <= 4064) instead of a 32-bit multiply per sub-block.
      __m512i mp[4];
      __m512 dw, dmw;
      if constexpr (kU) {
        for (int p = 0; p < 4; ++p) mp[p] = _mm512_load_si512(ub + 72 + p);
        dw = _mm512_castsi512_ps(_mm512_load_si512(ub + 76));
        dmw = _mm512_castsi512_ps(_mm512_load_si512(ub + 77));
      } else {
        for (int p = 0; p < 4; ++p) mp[p] = two_tiles_byte_pairs<false>(pa + kMnOff + 16 * p, pb + kMnOff + 16 * p);
        dw = two_tiles_fp16(pa, pb);
        dmw = two_tiles_fp16(pa + 16, pb + 16);
      }
      for (int r = 0; r < R; ++r) {
        const int16_t* s = a.row_s16(i0 + r) + 8 * b;
        __m512i msum = _mm512_setzero_si512();
        for (int p = 0; p < 4; ++p) msum = _mm512_dpwssd_epi32(msum, mp[p], _mm512_set1_epi32(load_i32(s + 2 * p)));
        const __m512 da = _mm512_set1_ps(a.row_d(i0 + r)[b]);
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, da), _mm512_cvtepi32_ps(isum[r]), acc[r]);
        acc[r] = _mm512_fnmadd_ps(_mm512_mul_ps(dmw, da), _mm512_cvtepi32_ps(msum), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(res + 16 * r, acc[r]);
  }

  template <int R>
  static void unit(const Q8Rows& a, int64_t i0, const uint8_t* t, int64_t tile_bytes, bool pair, float* res) {
    tiles2<R, false>(a, i0, t, pair ? t + tile_bytes : t, nullptr, res);
  }

  template <int R>
  static void unit_unpacked(const Q8Rows& a, int64_t i0, const __m512i* u, float* res) {
    tiles2<R, true>(a, i0, nullptr, nullptr, u, res);
  }
#else
  static constexpr int64_t kUnitTiles = 1;

  template <int R>
  static void unit(const Q8Rows& a, int64_t i0, const uint8_t* t, int64_t, bool, float* res) {
#if defined(PYSERVE_QUANT_AVX2)
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10), ones16 = _mm256_set1_epi16(1);
    auto ld = [](const uint8_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); };
    auto bytes8 = [](const uint8_t* x) {
      return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x)));
    };
    for (int64_t b = 0; b < a.nb; ++b) {
      const uint8_t* p = t + b * kTileBlockBytes;
      // No software prefetch on this one-tile path: it measured slower for Q4_K
      // (avx2 variant, m = 1, 2048x8192: 818 us with prefetcht1, 684 us without).
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m256 dmw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
      __m256i isum[R], msum[R];
      for (int r = 0; r < R; ++r) isum[r] = msum[r] = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        __m256i wl[4], wh[4];
        __m256i hb = _mm256_setzero_si256();
        if constexpr (kFive) hb = ld(p + hi_off(j));
        for (int g = 0; g < 4; ++g) {
          const __m256i raw = ld(p + lo_off(j) + 32 * g);
          wl[g] = _mm256_and_si256(raw, low4);
          wh[g] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
          if constexpr (kFive) {
            // Fifth bits g and 4 + g moved to bit 4 by one 16-bit shift each, then masked.
            wl[g] = _mm256_or_si256(wl[g], _mm256_and_si256(_mm256_slli_epi16(hb, 4 - g), bit4));
            wh[g] = _mm256_or_si256(wh[g], _mm256_and_si256(g == 0 ? hb : _mm256_srli_epi16(hb, g), bit4));
          }
        }
        const __m256i sc = bytes8(p + kScOff + 8 * j), mn = bytes8(p + kMnOff + 8 * j);
        for (int r = 0; r < R; ++r) {
          const int8_t* q = a.row_q(i0 + r) + 256 * b + 32 * j;
          const int32_t* s = a.row_s(i0 + r) + 8 * b + j;
          // u <= 31: 31 * 127 * 2 per int16 pair, 4 groups summed <= 31496.
          __m256i p0 = _mm256_maddubs_epi16(wl[0], _mm256_set1_epi32(load_i32(q)));
          __m256i p1 = _mm256_maddubs_epi16(wh[0], _mm256_set1_epi32(load_i32(q + 16)));
          for (int g = 1; g < 4; ++g) {
            p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(wl[g], _mm256_set1_epi32(load_i32(q + 4 * g))));
            p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(wh[g], _mm256_set1_epi32(load_i32(q + 16 + 4 * g))));
          }
          const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(p0, ones16), _mm256_madd_epi16(p1, ones16));
          isum[r] = _mm256_add_epi32(isum[r], _mm256_mullo_epi32(dot, sc));
          msum[r] = _mm256_add_epi32(msum[r], _mm256_mullo_epi32(mn, _mm256_set1_epi32(s[0])));
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 da = _mm256_set1_ps(a.row_d(i0 + r)[b]);
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(isum[r]), acc[r]);
        acc[r] = _mm256_fnmadd_ps(_mm256_mul_ps(dmw, da), _mm256_cvtepi32_ps(msum[r]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(res + 8 * r, acc[r]);
#else
    float acc[R][kTileRows] = {};
    for (int64_t b = 0; b < a.nb; ++b) {
      const uint8_t* p = t + b * kTileBlockBytes;
      for (int64_t col = 0; col < kTileRows; ++col) {
        uint16_t bits;
        std::memcpy(&bits, p + 2 * col, 2);
        const float dw = half_to_float(bits);
        std::memcpy(&bits, p + 16 + 2 * col, 2);
        const float dmw = half_to_float(bits);
        for (int r = 0; r < R; ++r) {
          const int8_t* q = a.row_q(i0 + r) + 256 * b;
          const int32_t* s = a.row_s(i0 + r) + 8 * b;
          int32_t isum = 0, msum = 0;
          for (int j = 0; j < 8; ++j) {
            int32_t dot = 0;
            for (int e = 32 * j; e < 32 * j + 32; ++e) dot += u_at(p, col, e) * q[e];
            isum += p[kScOff + j * kTileRows + col] * dot;
            msum += p[kMnOff + j * kTileRows + col] * s[j];
          }
          const float da = a.row_d(i0 + r)[b];
          acc[r][col] = std::fma(dw * da, static_cast<float>(isum), acc[r][col]);
          acc[r][col] = std::fma(-(dmw * da), static_cast<float>(msum), acc[r][col]);
        }
      }
    }
    for (int r = 0; r < R; ++r) std::memcpy(res + kTileRows * r, acc[r], sizeof(acc[r]));
#endif
  }
#endif

  static constexpr QuantFormat format(int64_t type, const char* name) {
    return QuantFormat{type, name, 256, kBlockBytes, kTileBlockBytes, &pack_tile, &dequant_row, nullptr,
                       &run_linear<QK45>};
  }
};

}  // namespace

const QuantFormat& q4_k_format() {
  static constexpr QuantFormat f = QK45<false>::format(12, "Q4_K");
  return f;
}

const QuantFormat& q5_k_format() {
  static constexpr QuantFormat f = QK45<true>::format(13, "Q5_K");
  return f;
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
