// Q6_K (ggml type 14): super-blocks of 256 weights, 16 sub-blocks of 16 with
// an int8 scale each and one fp16 d; 6-bit quants u (low 4 bits in ql, high 2
// in qh); weight = (d * sc[e / 16]) * (u - 32). Activations: blocks of 256
// with one fp32 scale and a sum per 16 (ggml's Q8_K, fp32 d).
//
// Packed tile block (8 rows, one super-block of each), 8 * 210 bytes:
//   fp16 d[8]                                    at 0
//   int8 sc[16][8]  (sub-block major)            at 16
//   8 chunks of 32 weights, chunk c at 144 + 192 c (lo_off, hi_off):
//     low nibbles as a block-32 4-bit tile block (block32.h): 128 bytes, byte
//     (g * 8 + r) * 4 + i holds u[32c + 4g + i] & 15 (low) and
//     u[32c + 16 + 4g + i] & 15 (high)
//     then the high 2 bits: 64 bytes, half h (0: weights 0-15 of the chunk,
//     1: 16-31), byte h * 32 + r * 4 + i holds (u[32c + 16h + 4g + i] >> 4) at
//     bits 2g, 2g + 1 for g < 4
//   A chunk's two planes sit together so that the kernels read a tile block
//   front to back: with the high bits in a second region (one stream per
//   plane) a 96 MB weight streamed from DRAM ~9% slower at m = 1.
// so a chunk's 8-row 6-bit quants come out of 6 vector loads with shifts and
// masks, 4 consecutive weights per row per 32-bit lane, as vpdpbusd wants.
//
// Result of row i, column j (every path): for each super-block b in order,
//   isum = sum_sub sc[sub] * (sum_{k in sub} u_k q_k - 32 * s_a[sub])   (exact int32)
//   acc = fma(d_w * d_a, float(isum), acc);  y = acc (+ bias).
#include <cstring>

#include "cpu/quant/block32.h"
#include "cpu/quant/driver.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {
namespace {

constexpr int64_t kBlockBytes = 210;  // ql[128], qh[64], int8 scales[16], fp16 d
constexpr int64_t kScOff = 16;
// Chunk c's low nibbles (128 bytes) then its high bits (64): the kernels read
// a tile block front to back, one stream (see the layout above).
constexpr int64_t lo_off(int64_t c) { return 144 + 192 * c; }
constexpr int64_t hi_off(int64_t c) { return 144 + 192 * c + 128; }

struct Q6K {
  static constexpr int64_t kTileBlockBytes = kTileRows * kBlockBytes;
  static constexpr int64_t kBlockElems = 256, kActBlock = 256, kActGroup = 16;

  // GGUF block -> u[256] (0..63), scales, raw fp16 d; the element order of
  // ggml's dequantize_row_q6_K.
  static void unpack(const uint8_t* blk, uint8_t u[256], int8_t sc[16], uint16_t* d) {
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t lo0 = ql[h * 64 + l], lo1 = ql[h * 64 + 32 + l], hb = qh[h * 32 + l];
        u[h * 128 + l] = static_cast<uint8_t>((lo0 & 15) | ((hb & 3) << 4));
        u[h * 128 + 32 + l] = static_cast<uint8_t>((lo1 & 15) | (((hb >> 2) & 3) << 4));
        u[h * 128 + 64 + l] = static_cast<uint8_t>((lo0 >> 4) | (((hb >> 4) & 3) << 4));
        u[h * 128 + 96 + l] = static_cast<uint8_t>((lo1 >> 4) | (((hb >> 6) & 3) << 4));
      }
    }
    std::memcpy(sc, blk + 192, 16);
    std::memcpy(d, blk + 208, 2);
  }

  static void pack_tile(const uint8_t* rows, int64_t row_stride, int64_t nrows, int64_t nb, uint8_t* tile) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* o = tile + b * kTileBlockBytes;
      uint16_t d[kTileRows] = {};
      int8_t sc[kTileRows][16] = {};
      uint8_t u[kTileRows][256];
      std::memset(u, 32, sizeof(u));  // padding rows: every weight 0
      for (int64_t r = 0; r < nrows; ++r) unpack(rows + r * row_stride + b * kBlockBytes, u[r], sc[r], &d[r]);
      std::memcpy(o, d, sizeof(d));
      for (int sub = 0; sub < 16; ++sub)
        for (int64_t r = 0; r < kTileRows; ++r) o[kScOff + sub * kTileRows + r] = static_cast<uint8_t>(sc[r][sub]);
      for (int c = 0; c < 8; ++c) {
        uint8_t* lo = o + lo_off(c);
        uint8_t* hi = o + hi_off(c);
        for (int64_t r = 0; r < kTileRows; ++r) {
          const uint8_t* ur = u[r] + 32 * c;
          for (int g = 0; g < 4; ++g)
            for (int i = 0; i < 4; ++i) lo[(g * kTileRows + r) * 4 + i] = static_cast<uint8_t>((ur[4 * g + i] & 15) | ((ur[16 + 4 * g + i] & 15) << 4));
          for (int h = 0; h < 2; ++h)
            for (int i = 0; i < 4; ++i) {
              uint8_t v = 0;
              for (int g = 0; g < 4; ++g) v = static_cast<uint8_t>(v | ((ur[16 * h + 4 * g + i] >> 4) << (2 * g)));
              hi[h * 32 + r * 4 + i] = v;
            }
        }
      }
    }
  }

  static int u_at(const uint8_t* o, int64_t r, int e) {
    const int c = e / 32, w = e % 32, h = w / 16, g = (w % 16) / 4, i = w % 4;
    const uint8_t lo = o[lo_off(c) + (g * kTileRows + r) * 4 + i];
    const uint8_t hi = o[hi_off(c) + h * 32 + r * 4 + i];
    return ((h == 0 ? lo : lo >> 4) & 15) | (((hi >> (2 * g)) & 3) << 4);
  }

  // gguf's dequantize: (d * sc) in fp32, times (u - 32).
  static void dequant_row(const uint8_t* tile, int64_t r, int64_t nb, float* out) {
    for (int64_t b = 0; b < nb; ++b, out += 256) {
      const uint8_t* o = tile + b * kTileBlockBytes;
      uint16_t bits;
      std::memcpy(&bits, o + 2 * r, 2);
      const float d = half_to_float(bits);
      for (int e = 0; e < 256; ++e) {
        const float dsc = d * static_cast<float>(static_cast<int8_t>(o[kScOff + (e / 16) * kTileRows + r]));
        out[e] = dsc * static_cast<float>(u_at(o, r, e) - 32);
      }
    }
  }

#if defined(PYSERVE_QUANT_VNNI)
  static constexpr int64_t kUnitTiles = 2;

  static __m512i scales16(const uint8_t* x, const uint8_t* y) {  // 8 int8 of each tile -> 16 int32
    return _mm512_cvtepi8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x)),
                                                   _mm_loadl_epi64(reinterpret_cast<const __m128i*>(y))));
  }
  // Chunk c of the two tiles' blocks pa, pb: the 6-bit quants 4g..4g+3 of
  // each lane in wl[g], 16+4g.. in wh[g], as vpdpbusd's unsigned bytes.
  static inline __attribute__((always_inline)) void unpack_chunk(const uint8_t* pa, const uint8_t* pb, int c,
                                                                 __m512i wl[4], __m512i wh[4]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30);
    // Group g's 2 high bits (bits 2g, 2g + 1 of a qh byte) moved to bits 4-5
    // with one 16-bit shift (none for g = 2) and masked: bits that cross from
    // the neighbouring byte land outside bits 4-5.
    auto hi_bits = [&](__m512i h, int g) {
      const __m512i t = g == 0 ? _mm512_slli_epi16(h, 4) : g == 1 ? _mm512_slli_epi16(h, 2) : g == 2 ? h : _mm512_srli_epi16(h, 2);
      return _mm512_and_si512(t, bits45);
    };
    const __m512i h0 = two_tiles32(pa + hi_off(c), pb + hi_off(c));
    const __m512i h1 = two_tiles32(pa + hi_off(c) + 32, pb + hi_off(c) + 32);
    for (int g = 0; g < 4; ++g) {
      const __m512i raw = two_tiles32(pa + lo_off(c) + 32 * g, pb + lo_off(c) + 32 * g);
      // 0xCA: low4 ? x : y, a bit select -- low nibble from the quants,
      // bits 4-5 from the high-bit plane (bits 6-7 of y are zero).
      wl[g] = _mm512_ternarylogic_epi32(low4, raw, hi_bits(h0, g), 0xCA);
      wh[g] = _mm512_ternarylogic_epi32(low4, _mm512_srli_epi16(raw, 4), hi_bits(h1, g), 0xCA);
    }
  }

  // Many rows: a unit's super-blocks unpacked once (unpack) into the vectors
  // the kernel would otherwise rebuild for every 8 rows -- per chunk c wl[4],
  // wh[4], sc0, sc1 at 10c; then the 8 scale pairs and d at 80 -- and each
  // group of rows then loads them (tiles2 with u). 5.6 KB per super-block.
  static constexpr int64_t kUnpackedVecs = 8 * 10 + 9;

  static void unpack(const uint8_t* ta, const uint8_t* tb, int64_t nb, __m512i* u) {
    for (int64_t b = 0; b < nb; ++b, u += kUnpackedVecs) {
      const uint8_t* pa = ta + b * kTileBlockBytes;
      const uint8_t* pb = tb + b * kTileBlockBytes;
      for (int c = 0; c < 8; ++c) {
        unpack_chunk(pa, pb, c, u + 10 * c, u + 10 * c + 4);
        u[10 * c + 8] = scales16(pa + kScOff + 16 * c, pb + kScOff + 16 * c);
        u[10 * c + 9] = scales16(pa + kScOff + 16 * c + 8, pb + kScOff + 16 * c + 8);
        u[80 + c] = two_tiles_byte_pairs<true>(pa + kScOff + 16 * c, pb + kScOff + 16 * c);
      }
      u[88] = _mm512_castps_si512(two_tiles_fp16(pa, pb));
    }
  }

  // Rows i0..i0+R-1 against two tiles (ta, tb), read from the packed weight
  // as it streams, or (kU) from unpack's vectors u.
  template <int R, bool kU>
  static void tiles2(const Q8Rows& a, int64_t i0, const uint8_t* ta, const uint8_t* tb, const __m512i* u,
                     float* res) {
    // The -32 of every weight: with 3+ rows once per super-block, isum -= 32 *
    // sum_sub sc[sub] * s_a[sub] as 8 int16 pair products per lane and row
    // (|sc| <= 128, |s_a| <= 2032; m = 64: 10-13% less time); with fewer the
    // scale pairs cost more than the two broadcasts per chunk they save, so
    // each sub-block's dot product starts at -32 * s_a instead (m = 1: 0-8%).
    // The same integers either way.
    constexpr bool kOffsetOnce = kU || R >= 3;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < a.nb; ++b) {
      const uint8_t* pa = kU ? nullptr : ta + b * kTileBlockBytes;
      const uint8_t* pb = kU ? nullptr : tb + b * kTileBlockBytes;
      const __m512i* ub = kU ? u + b * kUnpackedVecs : nullptr;
      if (!kU && a.m <= kMaxRows) prefetch_ahead<kTileBlockBytes>(pa, pb, b, a.nb);  // driver.h
      __m512i isum[R];
      for (int r = 0; r < R; ++r) isum[r] = _mm512_setzero_si512();
      for (int c = 0; c < 8; ++c) {
        __m512i wl[4], wh[4], sc0, sc1;
        if constexpr (kU) {
          for (int g = 0; g < 4; ++g) {
            wl[g] = _mm512_load_si512(ub + 10 * c + g);
            wh[g] = _mm512_load_si512(ub + 10 * c + 4 + g);
          }
          sc0 = _mm512_load_si512(ub + 10 * c + 8);
          sc1 = _mm512_load_si512(ub + 10 * c + 9);
        } else {
          unpack_chunk(pa, pb, c, wl, wh);
          sc0 = scales16(pa + kScOff + 16 * c, pb + kScOff + 16 * c);
          sc1 = scales16(pa + kScOff + 16 * c + 8, pb + kScOff + 16 * c + 8);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* q = a.row_q(i0 + r) + 256 * b + 32 * c;
          __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
          if constexpr (!kOffsetOnce) {
            const int32_t* s = a.row_s(i0 + r) + 16 * b + 2 * c;
            d0 = _mm512_set1_epi32(-32 * s[0]);
            d1 = _mm512_set1_epi32(-32 * s[1]);
          }
          for (int g = 0; g < 4; ++g) {
            d0 = _mm512_dpbusd_epi32(d0, wl[g], _mm512_set1_epi32(load_i32(q + 4 * g)));
            d1 = _mm512_dpbusd_epi32(d1, wh[g], _mm512_set1_epi32(load_i32(q + 16 + 4 * g)));
          }
          isum[r] = _mm512_add_epi32(isum[r], _mm512_add_epi32(_mm512_mullo_epi32(d0, sc0), _mm512_mullo_epi32(d1, sc1)));
        }
      }
      if constexpr (kOffsetOnce) {
        __m512i sp[8];
        for (int c = 0; c < 8; ++c) {
          if constexpr (kU) {
            sp[c] = _mm512_load_si512(ub + 80 + c);
          } else {
            sp[c] = two_tiles_byte_pairs<true>(pa + kScOff + 16 * c, pb + kScOff + 16 * c);
          }
        }
        for (int r = 0; r < R; ++r) {
          const int16_t* s = a.row_s16(i0 + r) + 16 * b;
          __m512i off = _mm512_setzero_si512();
          for (int c = 0; c < 8; ++c) off = _mm512_dpwssd_epi32(off, sp[c], _mm512_set1_epi32(load_i32(s + 2 * c)));
          isum[r] = _mm512_sub_epi32(isum[r], _mm512_slli_epi32(off, 5));
        }
      }
      __m512 dw;
      if constexpr (kU) {
        dw = _mm512_castsi512_ps(_mm512_load_si512(ub + 88));
      } else {
        dw = two_tiles_fp16(pa, pb);
      }
      for (int r = 0; r < R; ++r) {
        const float da = a.row_d(i0 + r)[b];
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(da)), _mm512_cvtepi32_ps(isum[r]), acc[r]);
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
    const __m256i low4 = _mm256_set1_epi8(0x0F), bits45 = _mm256_set1_epi8(0x30), ones16 = _mm256_set1_epi16(1);
    auto ld = [](const uint8_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); };
    auto hi_shift = [](__m256i h, int g) {
      return g == 0 ? _mm256_slli_epi16(h, 4) : g == 1 ? _mm256_slli_epi16(h, 2) : g == 2 ? h : _mm256_srli_epi16(h, 2);
    };
    for (int64_t b = 0; b < a.nb; ++b) {
      const uint8_t* p = t + b * kTileBlockBytes;
      if (a.m <= kMaxRows) prefetch_ahead<kTileBlockBytes>(p, b, a.nb);  // driver.h
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      __m256i isum[R];
      for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i h0 = ld(p + hi_off(c)), h1 = ld(p + hi_off(c) + 32);
        __m256i wl[4], wh[4];
        for (int g = 0; g < 4; ++g) {
          const __m256i raw = ld(p + lo_off(c) + 32 * g);
          // Bits 2g, 2g + 1 moved to 4-5 by one 16-bit shift (none for g = 2), then masked.
          const __m256i b0 = _mm256_and_si256(hi_shift(h0, g), bits45);
          const __m256i b1 = _mm256_and_si256(hi_shift(h1, g), bits45);
          wl[g] = _mm256_or_si256(_mm256_and_si256(raw, low4), b0);
          wh[g] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), b1);
        }
        const __m256i sc0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + kScOff + 16 * c)));
        const __m256i sc1 =
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + kScOff + 16 * c + 8)));
        for (int r = 0; r < R; ++r) {
          const int8_t* q = a.row_q(i0 + r) + 256 * b + 32 * c;
          const int32_t* s = a.row_s(i0 + r) + 16 * b + 2 * c;
          // u <= 63: 63 * 127 * 2 per int16 pair, widened to int32 per group.
          __m256i d0 = _mm256_set1_epi32(-32 * s[0]), d1 = _mm256_set1_epi32(-32 * s[1]);
          for (int g = 0; g < 4; ++g) {
            d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(_mm256_maddubs_epi16(wl[g], _mm256_set1_epi32(load_i32(q + 4 * g))), ones16));
            d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(_mm256_maddubs_epi16(wh[g], _mm256_set1_epi32(load_i32(q + 16 + 4 * g))), ones16));
          }
          isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(_mm256_mullo_epi32(d0, sc0), _mm256_mullo_epi32(d1, sc1)));
        }
      }
      for (int r = 0; r < R; ++r) {
        const float da = a.row_d(i0 + r)[b];
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(da)), _mm256_cvtepi32_ps(isum[r]), acc[r]);
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
        for (int r = 0; r < R; ++r) {
          const int8_t* q = a.row_q(i0 + r) + 256 * b;
          const int32_t* s = a.row_s(i0 + r) + 16 * b;
          int32_t isum = 0;
          for (int sub = 0; sub < 16; ++sub) {
            int32_t dot = -32 * s[sub];
            for (int e = 16 * sub; e < 16 * sub + 16; ++e) dot += u_at(p, col, e) * q[e];
            isum += static_cast<int8_t>(p[kScOff + sub * kTileRows + col]) * dot;
          }
          acc[r][col] = std::fma(dw * a.row_d(i0 + r)[b], static_cast<float>(isum), acc[r][col]);
        }
      }
    }
    for (int r = 0; r < R; ++r) std::memcpy(res + kTileRows * r, acc[r], sizeof(acc[r]));
#endif
  }
#endif
};

}  // namespace

const QuantFormat& q6_k_format() {
  static constexpr QuantFormat f{14, "Q6_K", 256, kBlockBytes, Q6K::kTileBlockBytes, &Q6K::pack_tile,
                                 &Q6K::dequant_row, nullptr, &run_linear<Q6K>};
  return f;
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
