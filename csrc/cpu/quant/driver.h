// The loop around a format's micro-kernel, shared by every format: quantize
// x's rows, split the output columns (tiles) over threads, run the kernel on
// each unit of tiles for kMaxRows activation rows at a time, add the bias and
// store. A kernel class K provides:
//   kBlockElems     weights per block (32, or 256 for the K-quants)
//   kActBlock, kActGroup  activation scale block and sum group (activations.h)
//   kTileBlockBytes packed bytes of one block of kTileRows rows
//   kUnitTiles      tiles one kernel call computes (2 on AVX-512: 16 lanes)
//   template <int R> static void unit(const Q8Rows&, int64_t i0, const uint8_t* tile,
//                                     int64_t tile_bytes, bool pair, float* res)
//     res[r][kUnitTiles * kTileRows] for rows i0..i0+R-1; with pair false only
//     the first tile exists (the kernel may compute the missing one as a copy).
// Each lane of a kernel is one output column, accumulated block by block in a
// fixed order, so a row's result depends on neither m, nor the row's place,
// nor the thread split.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#include "cpu/quant/activations.h"
#include "cpu/quant/format.h"
#include "cpu/quant/simd.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant {

// Activation rows per kernel call: each unpacked weight block serves this many
// rows. AVX-512 has 32 zmm registers: 8 rows keep 8 accumulators next to the
// 8 unpacked weight vectors of a block (a few spill in the K-quants, whose
// accumulators change once per super-block); AVX2's 16 ymm hold 4. The rows
// per call change nothing in a row's arithmetic (one lane per column, blocks
// in order), so results stay independent of m.
#if defined(PYSERVE_QUANT_VNNI)
constexpr int kMaxRows = 8;
#else
constexpr int kMaxRows = 4;
#endif

#if defined(PYSERVE_QUANT_VNNI) || defined(PYSERVE_QUANT_AVX2)
// A decode call (m <= kMaxRows) streams its weight once: the SIMD kernels
// ask for block b's bytes kPrefetchBytes ahead in each tile they read (p:
// block b of the tile). Near a tile's end the lookahead moves on into the
// following tile(s), whose stream would otherwise start cold: with short
// rows (the LM head's 18 blocks) that restart is frequent. Into L2 (T1), not
// L1: on the development machine's EPYC, prefetcht0 held the LM head at
// ~10 GB/s on one core, prefetcht1 at ~19 GB/s (bench_quant_linear, m = 1,
// one thread).
constexpr int64_t kPrefetchBytes = 4096;

template <int64_t kTileBlockBytes>
inline void prefetch_ahead(const uint8_t* p, int64_t b, int64_t nb) {
  const int64_t ahead = (b * kTileBlockBytes + kPrefetchBytes < nb * kTileBlockBytes)
                            ? kPrefetchBytes
                            : kPrefetchBytes + nb * kTileBlockBytes;
  for (int64_t l = 0; l < kTileBlockBytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + ahead + l), _MM_HINT_T1);
}

// The AVX-512 kernels' two tiles (pa, pb: block b of each).
template <int64_t kTileBlockBytes>
inline void prefetch_ahead(const uint8_t* pa, const uint8_t* pb, int64_t b, int64_t nb) {
  prefetch_ahead<kTileBlockBytes>(pa, b, nb);
  prefetch_ahead<kTileBlockBytes>(pb, b, nb);
}
#endif

// Activation bytes (int8) a thread keeps hot while its tiles pass over them.
// A prefill's rows (1249 x 2048: 2.5 MB) do not fit a core's L2 (1 MB on the
// development machine's EPYC): taken whole, every tile re-reads them from L3.
// In blocks of this many bytes the rows stay in L2 and each tile is re-read
// once per block instead (from L3 or DRAM, ~1% of the time): 2048 -> 16384 at
// m = 1249 on two threads, 4% less time for Q4_K, 8% for Q6_K (128 KB and
// 512 KB blocks measured the same).
constexpr int64_t kRowBlockBytes = 256 << 10;

#if defined(PYSERVE_QUANT_VNNI)
// A kernel class may also offer a many-row path: K::kUnpackedVecs vectors per
// block that K::unpack(ta, tb, nb, u) builds once for a unit (its two tiles),
// and K::unit_unpacked<R>(a, i0, u, res), which reads them instead of
// unpacking the weight again for every kMaxRows rows. Same integers, same
// results.
template <class K, class = void>
struct HasUnpacked : std::false_type {};
template <class K>
struct HasUnpacked<K, std::void_t<decltype(K::kUnpackedVecs)>> : std::true_type {};

// A thread's scratch for unpacked vectors, grown as needed and kept.
inline __m512i* unpack_scratch(int64_t vecs) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<void, Free> buf;  // raw bytes: __m512i's alignment attribute does not fit a template
  thread_local int64_t size = 0;
  if (vecs > size) {
    buf.reset(std::aligned_alloc(64, vecs * 64));
    size = vecs;
  }
  return static_cast<__m512i*>(buf.get());
}
#endif

template <class K, int R>
inline void unit_rows(const Q8Rows& a, int64_t i, const uint8_t* tp, int64_t tile_bytes, bool pair,
                      const void* unpacked, float* res) {
#if defined(PYSERVE_QUANT_VNNI)
  if constexpr (HasUnpacked<K>::value) {
    if (unpacked != nullptr) return K::template unit_unpacked<R>(a, i, static_cast<const __m512i*>(unpacked), res);
  }
#endif
  (void)unpacked;
  K::template unit<R>(a, i, tp, tile_bytes, pair, res);
}

template <class K>
void run_tiles(const Q8Rows& a, const uint8_t* packed, int64_t t0, int64_t t1, int64_t out_features,
               const float* bias, float* out, int64_t ldo) {
  const int64_t tile_bytes = (a.k / K::kBlockElems) * K::kTileBlockBytes;
  constexpr int64_t kCols = K::kUnitTiles * kTileRows;
  float res[kMaxRows * kCols];
  const int64_t row_block = std::max<int64_t>(1, kRowBlockBytes / a.k / kMaxRows) * kMaxRows;
  for (int64_t i0 = 0; i0 < a.m; i0 += row_block) {
    const int64_t i1 = std::min(a.m, i0 + row_block);
    for (int64_t t = t0; t < t1; t += K::kUnitTiles) {
      const bool pair = t + 1 < t1;
      const uint8_t* tp = packed + t * tile_bytes;
      const int64_t col0 = t * kTileRows;
      const int64_t ncols = std::min<int64_t>(std::min<int64_t>(K::kUnitTiles, t1 - t) * kTileRows, out_features - col0);
      const void* unpacked = nullptr;
#if defined(PYSERVE_QUANT_VNNI)
      if constexpr (HasUnpacked<K>::value) {
        // Only for 8+ row groups per unpack: the unpacked vectors are ~4x the
        // packed bytes, and with fewer groups (m = 32; or k = 8192, whose row
        // block is 32 rows) writing and re-reading them from L2 cost more than
        // unpacking again (2 threads: 3.5% slower at m = 32, Q6_K 23% slower
        // at 1249 x 8192), while 1249 x 2048 gains 6-8%.
        if (i1 - i0 >= 8 * kMaxRows) {
          __m512i* u = unpack_scratch(a.nb * K::kUnpackedVecs);
          K::unpack(tp, pair ? tp + tile_bytes : tp, a.nb, u);
          unpacked = u;
        }
      }
#endif
      for (int64_t i = i0; i < i1; i += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, i1 - i);
        switch (rows) {
#if defined(PYSERVE_QUANT_VNNI)
          case 8: unit_rows<K, 8>(a, i, tp, tile_bytes, pair, unpacked, res); break;
          case 7: unit_rows<K, 7>(a, i, tp, tile_bytes, pair, unpacked, res); break;
          case 6: unit_rows<K, 6>(a, i, tp, tile_bytes, pair, unpacked, res); break;
          case 5: unit_rows<K, 5>(a, i, tp, tile_bytes, pair, unpacked, res); break;
#endif
          case 4: unit_rows<K, 4>(a, i, tp, tile_bytes, pair, unpacked, res); break;
          case 3: unit_rows<K, 3>(a, i, tp, tile_bytes, pair, unpacked, res); break;
          case 2: unit_rows<K, 2>(a, i, tp, tile_bytes, pair, unpacked, res); break;
          default: unit_rows<K, 1>(a, i, tp, tile_bytes, pair, unpacked, res); break;
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* o = out + (i + r) * ldo + col0;
          const float* v = res + r * kCols;
          if (bias != nullptr) {
            for (int64_t c = 0; c < ncols; ++c) o[c] = v[c] + bias[col0 + c];
          } else {
            std::memcpy(o, v, ncols * sizeof(float));
          }
        }
      }
    }
  }
}

template <class K>
void run_linear(const float* x, int64_t ldx, int64_t m, const uint8_t* packed, int64_t out_features,
                int64_t in_features, const float* bias, float* out, int64_t ldo) {
  if (m == 0 || out_features == 0) return;
  const Q8Rows a = quantize_rows_q8(x, ldx, m, in_features, K::kActBlock, K::kActGroup);
  const int64_t tiles = (out_features + kTileRows - 1) / kTileRows;
  const int64_t units = (tiles + K::kUnitTiles - 1) / K::kUnitTiles;
  // A unit is ~kUnitTiles * 8 * in_features MACs per activation row; below
  // ~128k MACs per thread a thread wake-up costs more than it saves.
  const int64_t unit_macs = std::max<int64_t>(1, std::min<int64_t>(m, 64) * in_features * kTileRows * K::kUnitTiles);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / unit_macs);
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    run_tiles<K>(a, packed, begin * K::kUnitTiles, std::min(tiles, end * K::kUnitTiles), out_features, bias, out,
                 ldo);
  });
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY::quant
