// CPU sampling: one token per logits row, exactly as csrc/SAMPLING.md defines
// it (the CUDA kernel implements the same text, so both pick the same token).
//
// Rows are independent and run in parallel. Per row, with V = vocab:
//   1. logits -> fp32 scratch, raw max and sum of exp (one vectorized exp
//      pass) for sampled_logprob and the top-N logprobs (threshold-pruned
//      candidate selection, never a full sort);
//   2. logit bias and penalties touch only the listed ids (per-thread count
//      and mark arrays stay zero between rows, so nothing is O(V) there);
//   3. with an allowed-token bitmask, one more pass sets the logits of the
//      disallowed ids to -inf and takes the max of the rest (one shift and
//      one blend per 8 ids); nothing else reads the mask except the
//      rare fallbacks, because a disallowed id then behaves exactly like an
//      absent one (below);
//   4. greedy argmax, or w = exp(x / T - max) (second vectorized exp pass).
// Every filter in SAMPLING.md is a threshold on w: K = {w >= t_k},
// P = {i in K : w >= t_p}, M = {i in P : w >= mp}, so M = {w >= theta} with
// theta = max(t_k, t_p, mp). t_k comes from a one-pass running-threshold
// selection; t_p from sorting K's values when K is small, otherwise from a
// mass histogram over w's float bits (radix select, usually over just the
// w >= 2^-12, packed branch-free) plus a sort of the one bucket where the
// cumulative mass crosses p * Z_K. The draw then walks M in id order. Masses are summed in double so the summation order (which the
// CUDA kernel cannot share) changes a decision only if u lands within ~1e-16
// of a boundary.
//
// Why -inf is "absent" (SAMPLING.md step 5): a disallowed id gets w = 0.
// Every threshold is either > 0, where zeros do not count, or 0, where the
// absent-id definition gives 0 too (fewer than k allowed ids with w > 0);
// zeros add no mass to Z_K or Z; and the walk never picks a w = 0 id (its
// c + 0 > u * Z would need c > u * Z, so an earlier id was picked). Only
// the fallbacks (greedy when every allowed logit is -inf; the draw's
// past-the-end and empty-M rules) and the degenerate max z = -inf or NaN
// (where exp(-inf - max z) is not 0) consult the mask again.
#include "dispatch.h"
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/vec.h"
#include "ops.h"
#include "validate.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kGreedyTemperature = 1e-5f;
// Top-p over at most this many kept values sorts them; above, radix select.
constexpr int64_t kSortTopPLimit = 2048;
// Histogram buckets: the sign, 8 exponent and 4 mantissa bits of a w in
// [0, 1] (1.0f is bucket 0x3F800000 >> 19 = 2032), so each bucket spans a
// factor 2^(1/16) of w; kHistCopies interleaved copies break the
// store-to-load dependency when consecutive ids land in the same bucket.
constexpr int kBucketShift = 19;
constexpr int64_t kBuckets = 2048;
constexpr int64_t kHistCopies = 4;

// ---- the random number (SAMPLING.md step 8) --------------------------------

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline double uniform(int64_t seed, int64_t step) {
  const uint64_t h = splitmix64(splitmix64(static_cast<uint64_t>(seed)) + static_cast<uint64_t>(step));
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

// ---- vectorized row passes ---------------------------------------------------

inline uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

inline float bits_float(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// NaN-safe ordering key: a NaN sorts as -inf, so comparators stay strict weak
// orderings (std::sort / nth_element read out of bounds otherwise).
inline float key(float v) { return std::isnan(v) ? -kInf : v; }

// dst[i] = float(src[i]); returns max_i dst[i].
template <typename T>
float load_row(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  float m = -kInf;
#ifdef PYSERVE_HAVE_AVX2
  __m256 mv = _mm256_set1_ps(-kInf);
  for (; i + 8 <= n; i += 8) {
    __m256 v = load8(src + i);
    _mm256_storeu_ps(dst + i, v);
    mv = _mm256_max_ps(mv, v);
  }
  m = hmax(mv);
#endif
  for (; i < n; ++i) {
    dst[i] = to_float(src[i]);
    m = std::max(m, dst[i]);
  }
  return m;
}

float row_max(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -kInf;
#ifdef PYSERVE_HAVE_AVX2
  __m256 mv = _mm256_set1_ps(-kInf);
  for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
  m = hmax(mv);
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// sum_i exp(x[i] - m), accumulated in 4 x 8 float lanes (the scalar path
// in a double: one float accumulator over a whole vocab drifts by ~1e-4).
float sum_exp(const float* x, int64_t n, float m) {
  int64_t i = 0;
  double s = 0.0;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 mv = _mm256_set1_ps(m);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
    a1 = _mm256_add_ps(a1, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), mv)));
    a2 = _mm256_add_ps(a2, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 16), mv)));
    a3 = _mm256_add_ps(a3, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 24), mv)));
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_add_ps(a0, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
  s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; i < n; ++i) s += std::exp(x[i] - m);
  return static_cast<float>(s);
}

// The first i with x[i] == v (0 if none, e.g. an all-NaN row).
int64_t first_equal(const float* x, int64_t n, float v) {
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 vv = _mm256_set1_ps(v);
  for (; i + 8 <= n; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vv, _CMP_EQ_OQ));
    if (mask) return i + __builtin_ctz(mask);
  }
#endif
  for (; i < n; ++i)
    if (x[i] == v) return i;
  return 0;
}

// ---- the allowed-token bitmask (SAMPLING.md step 5) ----------------------------

// One row of the mask: bit i % 32 of word i / 32 set = id i allowed; ids at or
// past 32 * num_words are not allowed.
struct Allowed {
  bool masked;            // false: every id is allowed
  const uint32_t* words;  // [num_words] (may be null when num_words == 0)
  int64_t num_words;
  bool operator()(int64_t i) const {
    if (!masked) return true;
    const int64_t w = i >> 5;
    return w < num_words && (words[w] >> (i & 31) & 1u);
  }
  // The 8 mask bits of ids i..i+7 (i a multiple of 8) as the low byte.
  uint32_t byte_at(int64_t i) const {
    const int64_t w = i >> 5;
    return w < num_words ? (words[w] >> (i & 31)) & 0xFFu : 0u;
  }
};

// The lowest (first = true) or highest allowed id in [0, n), or -1 if none.
int64_t allowed_end(const Allowed& a, int64_t n, bool first) {
  if (!a.masked) return n > 0 ? (first ? 0 : n - 1) : -1;
  const int64_t nw = std::min<int64_t>(a.num_words, (n + 31) / 32);
  auto word = [&](int64_t w) {
    uint32_t bits = a.words[w];
    if (32 * w + 32 > n) bits &= (1u << (n - 32 * w)) - 1u;  // ids >= n are ignored
    return bits;
  };
  if (first) {
    for (int64_t w = 0; w < nw; ++w)
      if (const uint32_t bits = word(w)) return 32 * w + __builtin_ctz(bits);
  } else {
    for (int64_t w = nw - 1; w >= 0; --w)
      if (const uint32_t bits = word(w)) return 32 * w + 31 - __builtin_clz(bits);
  }
  return -1;
}

// In place: x[i] <- -inf for every disallowed id; returns max_i x[i] (the max
// over the allowed ids, -inf if none), with row_max's lane order (8-id blocks
// in id order into one vector, then the scalar tail) so that an all-allowed
// mask gives row_max's result even with NaNs.
float mask_row(float* x, int64_t n, const Allowed& a) {
  int64_t i = 0;
  float m = -kInf;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 ninf = _mm256_set1_ps(-kInf);
  __m256 mv = ninf;
  // A whole word at a time: shifting the word left by 31 - (lane's bit) puts
  // that bit in the lane's sign, which is what blendv reads.
  const __m256i shift0 = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  const __m256i eight = _mm256_set1_epi32(8);
  const int64_t full_words = std::min<int64_t>(a.num_words, n / 32);
  for (int64_t w = 0; w < full_words; ++w, i += 32) {
    const __m256i word = _mm256_set1_epi32(static_cast<int>(a.words[w]));
    __m256i shift = shift0;
    for (int j = 0; j < 4; ++j, shift = _mm256_sub_epi32(shift, eight)) {
      const __m256 keep = _mm256_castsi256_ps(_mm256_sllv_epi32(word, shift));
      const __m256 v = _mm256_blendv_ps(ninf, _mm256_loadu_ps(x + i + 8 * j), keep);
      _mm256_storeu_ps(x + i + 8 * j, v);
      mv = _mm256_max_ps(mv, v);
    }
  }
  // The rest in 8-id blocks: a partial last word, or ids past the mask's words.
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (; i + 8 <= n; i += 8) {
    const __m256i sel = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(a.byte_at(i))), lane_bit);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(sel, lane_bit));
    const __m256 v = _mm256_blendv_ps(ninf, _mm256_loadu_ps(x + i), keep);
    _mm256_storeu_ps(x + i, v);
    mv = _mm256_max_ps(mv, v);
  }
  m = hmax(mv);
#endif
  for (; i < n; ++i) {
    if (!a(i)) x[i] = -kInf;
    m = std::max(m, x[i]);
  }
  return m;
}

// In place: x[i] <- exp(x[i] / T - zmax), NaN -> 0. True division (not a
// multiply by 1/T) so z rounds exactly like the reference's x / T.
void compute_weights(float* x, int64_t n, float T, float zmax) {
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 tv = _mm256_set1_ps(T), mv = _mm256_set1_ps(zmax), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 w = exp8(_mm256_sub_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), tv), mv));
    _mm256_storeu_ps(x + i, _mm256_max_ps(w, zero));  // maxps returns the 2nd operand for NaN
  }
#endif
  for (; i < n; ++i) {
    const float w = std::exp(x[i] / T - zmax);
    x[i] = std::isnan(w) ? 0.f : w;
  }
}

// Appends to ids/vals every i with w[i] >= thr, in increasing id order.
void collect_at_least(const float* w, int64_t n, float thr, std::vector<int32_t>& ids, std::vector<float>& vals) {
  ids.clear();
  vals.clear();
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 tv = _mm256_set1_ps(thr);
  for (; i + 8 <= n; i += 8) {
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(w + i), tv, _CMP_GE_OQ));
    while (mask) {
      const int j = __builtin_ctz(mask);
      mask &= mask - 1;
      ids.push_back(static_cast<int32_t>(i + j));
      vals.push_back(w[i + j]);
    }
  }
#endif
  for (; i < n; ++i)
    if (w[i] >= thr) {
      ids.push_back(static_cast<int32_t>(i));
      vals.push_back(w[i]);
    }
}

// ---- selections -------------------------------------------------------------

// The k-th largest of w[0..n) counted with multiplicity (1 <= k < n), in one
// pass: keep a buffer of candidates; whenever it fills, keep its k largest
// and raise the bar to the k-th of them. A later value <= the bar cannot
// change the k-th largest, so only values above it are buffered, and once the
// bar is high whole 8-lane blocks are skipped with one compare.
float kth_largest(const float* w, int64_t n, int64_t k, std::vector<float>& buf) {
  const int64_t cap = std::max<int64_t>(2 * k, k + 512);
  buf.clear();
  float bar = -kInf;  // w >= 0 and NaN-free, so everything passes at first
  auto prune = [&] {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<float>());
    buf.resize(k);
    bar = buf[k - 1];  // nth_element leaves the k-th largest there
  };
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  for (; i + 8 <= n; i += 8) {
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(w + i), _mm256_set1_ps(bar), _CMP_GT_OQ));
    if (!mask) continue;
    while (mask) {
      const int j = __builtin_ctz(mask);
      mask &= mask - 1;
      buf.push_back(w[i + j]);
    }
    if (static_cast<int64_t>(buf.size()) >= cap) prune();
  }
#endif
  for (; i < n; ++i) {
    if (w[i] > bar) buf.push_back(w[i]);
    if (static_cast<int64_t>(buf.size()) >= cap) prune();
  }
  if (static_cast<int64_t>(buf.size()) < k) return 0.f;  // unreachable for NaN-free w
  prune();
  return bar;
}

// t_p from values sorted in descending order: walk whole tie groups and stop
// at the first value v whose cumulative mass (everything >= v) reaches
// target. cum is the mass of all values above this list (radix select).
float top_p_walk_sorted(const float* sorted, int64_t n, double cum, double target) {
  for (int64_t i = 0; i < n;) {
    const float v = sorted[i];
    for (; i < n && sorted[i] == v; ++i) cum += sorted[i];
    if (cum >= target) return v;
  }
  return n > 0 ? sorted[n - 1] : 0.f;  // rounding fallback: keep the whole list
}

// t_p (SAMPLING.md step 7) over the n values get(0..n) (all >= 0, <= 1).
// Small sets are sorted. Large ones use a mass histogram keyed by the float's
// top bits (monotone in the value for non-negative floats): walk buckets from
// the top to the one where the mass crosses p * Z_K, then sort just that
// bucket's values. Z_K is the bucket total, summed in the same order as the
// walk so the crossing always exists.
template <typename Get>
float top_p_threshold(int64_t n, Get get, float p, std::vector<float>& buf, std::vector<double>& hist) {
  if (n <= kSortTopPLimit) {
    buf.resize(n);
    double z = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = get(i);
      z += buf[i];
    }
    std::sort(buf.begin(), buf.end(), std::greater<float>());
    return top_p_walk_sorted(buf.data(), n, 0.0, static_cast<double>(p) * z);
  }
  hist.assign(kBuckets * kHistCopies, 0.0);
  auto bucket = [](float v) { return std::min<int64_t>(float_bits(v) >> kBucketShift, kBuckets - 1); };
  int64_t i = 0;
  for (; i + kHistCopies <= n; i += kHistCopies)
    for (int64_t c = 0; c < kHistCopies; ++c) {
      const float v = get(i + c);
      hist[c * kBuckets + bucket(v)] += v;
    }
  for (; i < n; ++i) hist[bucket(get(i))] += get(i);
  for (int64_t b = 0; b < kBuckets; ++b)
    for (int64_t c = 1; c < kHistCopies; ++c) hist[b] += hist[c * kBuckets + b];
  double z = 0.0;
  for (int64_t b = kBuckets - 1; b >= 0; --b) z += hist[b];
  const double target = static_cast<double>(p) * z;
  double cum = 0.0;
  int64_t cross = -1;
  for (int64_t b = kBuckets - 1; b >= 0; --b) {
    if (cum + hist[b] >= target) {
      cross = b;
      break;
    }
    cum += hist[b];
  }
  if (cross < 0) return 0.f;  // only when every weight is 0: keep everything
  buf.clear();
  for (int64_t j = 0; j < n; ++j) {
    const float v = get(j);
    if (bucket(v) == cross) buf.push_back(v);
  }
  std::sort(buf.begin(), buf.end(), std::greater<float>());
  return top_p_walk_sorted(buf.data(), static_cast<int64_t>(buf.size()), cum, target);
}

#ifdef PYSERVE_HAVE_AVX2
// kCompress.idx[mask] lists the set lanes of an 8-bit mask first: with
// _mm256_permutevar8x32_ps it packs the selected lanes of a vector to the
// front, so filtering a row needs no data-dependent branch.
struct CompressLut {
  alignas(32) int32_t idx[256][8];
};
constexpr CompressLut make_compress_lut() {
  CompressLut lut{};
  for (int m = 0; m < 256; ++m) {
    int k = 0;
    for (int j = 0; j < 8; ++j)
      if (m >> j & 1) lut.idx[m][k++] = j;
  }
  return lut;
}
constexpr CompressLut kCompress = make_compress_lut();
#endif

// t_p over a whole row of weights. Usually the top-p mass sits well above
// tiny weights, so first pack the w >= kTopPFloor (a power of two, hence a
// bucket boundary: those buckets hold exactly the values >= it) into `packed`
// and add the rest up as one vectorized "low" mass; histogram and search only
// the packed values. Only if the crossing falls below the floor, redo it over
// everything.
constexpr float kTopPFloor = 0x1.0p-12f;

float top_p_threshold_row(const float* w, int64_t n, float p, float* packed, std::vector<float>& buf,
                          std::vector<double>& hist) {
#ifdef PYSERVE_HAVE_AVX2
  if (n > kSortTopPLimit) {
    const __m256 floor = _mm256_set1_ps(kTopPFloor);
    __m256d low = _mm256_setzero_pd();
    int64_t i = 0, np = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(w + i);
      const __m256 is_high = _mm256_cmp_ps(v, floor, _CMP_GE_OQ);
      const __m256 lv = _mm256_andnot_ps(is_high, v);
      low = _mm256_add_pd(low, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(lv)),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(lv, 1))));
      const int mask = _mm256_movemask_ps(is_high);
      const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.idx[mask]));
      _mm256_storeu_ps(packed + np, _mm256_permutevar8x32_ps(v, idx));  // packed has 8 floats of slack
      np += __builtin_popcount(mask);
    }
    __m128d l2 = _mm_add_pd(_mm256_castpd256_pd128(low), _mm256_extractf128_pd(low, 1));
    double low_mass = _mm_cvtsd_f64(_mm_add_sd(l2, _mm_unpackhi_pd(l2, l2)));
    for (; i < n; ++i) {
      if (w[i] < kTopPFloor)
        low_mass += w[i];
      else
        packed[np++] = w[i];
    }
    // Histogram of the packed values (kHistCopies interleaved copies).
    hist.assign(kBuckets * kHistCopies, 0.0);
    auto bucket = [](float v) { return std::min<int64_t>(float_bits(v) >> kBucketShift, kBuckets - 1); };
    int64_t j = 0;
    for (; j + kHistCopies <= np; j += kHistCopies)
      for (int64_t c = 0; c < kHistCopies; ++c) hist[c * kBuckets + bucket(packed[j + c])] += packed[j + c];
    for (; j < np; ++j) hist[bucket(packed[j])] += packed[j];
    const int64_t floor_bucket = float_bits(kTopPFloor) >> kBucketShift;
    for (int64_t b = floor_bucket; b < kBuckets; ++b)
      for (int64_t c = 1; c < kHistCopies; ++c) hist[b] += hist[c * kBuckets + b];
    double z = low_mass;
    for (int64_t b = kBuckets - 1; b >= floor_bucket; --b) z += hist[b];
    const double target = static_cast<double>(p) * z;
    double cum = 0.0;
    for (int64_t b = kBuckets - 1; b >= floor_bucket; --b) {
      if (cum + hist[b] >= target) {
        buf.clear();
        for (int64_t q = 0; q < np; ++q)
          if (bucket(packed[q]) == b) buf.push_back(packed[q]);
        std::sort(buf.begin(), buf.end(), std::greater<float>());
        return top_p_walk_sorted(buf.data(), static_cast<int64_t>(buf.size()), cum, target);
      }
      cum += hist[b];
    }
  }
#else
  (void)packed;
#endif
  return top_p_threshold(n, [w](int64_t i) { return w[i]; }, p, buf, hist);
}

// ---- the draw -----------------------------------------------------------------

#ifdef PYSERVE_HAVE_AVX2
// acc += the lanes of w[0..8) that are >= theta, widened to double.
inline __m256d add_kept(__m256d acc, const float* w, __m256 tv) {
  const __m256 v = _mm256_loadu_ps(w);
  const __m256 kept = _mm256_and_ps(v, _mm256_cmp_ps(v, tv, _CMP_GE_OQ));
  acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(kept)));
  return _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(kept, 1)));
}

inline double hsum_pd(__m256d v) {
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}
#endif

// Draw from M = {i : w[i] >= theta} over the whole row. The running sum moves
// a group of kDrawGroup ids at a time (vector sums in double) and only the
// group that crosses u * Z is walked id by id. Z is summed in another order;
// in double that moves the crossing by ~1e-16 of Z, and if it ever makes the
// walk run out, the past-the-end rule below applies.
constexpr int64_t kDrawGroup = 64;

int64_t draw_full(const float* w, int64_t n, float theta, double u, const Allowed& allowed) {
  double z = 0.0;
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 tv = _mm256_set1_ps(theta);
  __m256d a0 = _mm256_setzero_pd(), a1 = a0;
  for (; i + 16 <= n; i += 16) {
    a0 = add_kept(a0, w + i, tv);
    a1 = add_kept(a1, w + i + 8, tv);
  }
  z = hsum_pd(_mm256_add_pd(a0, a1));
#endif
  for (; i < n; ++i)
    if (w[i] >= theta) z += w[i];
  const double target = u * z;
  double c = 0.0;
  i = 0;
#ifdef PYSERVE_HAVE_AVX2
  for (; i + kDrawGroup <= n; i += kDrawGroup) {
    __m256d acc = _mm256_setzero_pd();
    for (int64_t j = i; j < i + kDrawGroup; j += 8) acc = add_kept(acc, w + j, tv);
    const double g = hsum_pd(acc);
    if (c + g > target) break;  // the crossing is in this group: walk it below
    c += g;
  }
#endif
  for (; i < n; ++i)
    if (w[i] >= theta) {
      if (c + w[i] > target) return i;
      c += w[i];
    }
  // Rounding walked past the end: the last id of M; M empty: the last allowed id.
  for (int64_t j = n - 1; j >= 0; --j)
    if (w[j] >= theta && allowed(j)) return j;
  return allowed_end(allowed, n, /*first=*/false);
}

// Same draw over a candidate list (ids increasing, vals = w[ids]) that holds M.
// Its fallbacks are draw_full's (the list may hold disallowed ids with w = 0).
int64_t draw_list(const std::vector<int32_t>& ids, const std::vector<float>& vals, float theta, double u,
                  int64_t V, const Allowed& allowed) {
  const int64_t n = static_cast<int64_t>(ids.size());
  double z = 0.0;
  int64_t last = -1;
  for (int64_t i = 0; i < n; ++i)
    if (vals[i] >= theta) {
      z += vals[i];
      if (allowed(ids[i])) last = ids[i];
    }
  const double target = u * z;
  double c = 0.0;
  for (int64_t i = 0; i < n; ++i)
    if (vals[i] >= theta) {
      if (c + vals[i] > target) return ids[i];
      c += vals[i];
    }
  return last >= 0 ? last : allowed_end(allowed, V, /*first=*/false);
}

// ---- per row -------------------------------------------------------------------

struct Scratch {
  std::vector<float> x;                        // [V] logits, then weights w
  std::vector<int32_t> counts;                 // [V], all zero between rows
  std::vector<uint8_t> seen;                   // [V], all zero between rows
  std::vector<float> buf;                      // selection buffer
  std::vector<float> packed;                   // [V + 8] filtered weights
  std::vector<std::pair<float, int64_t>> top;  // top-N candidates (x, id)
  std::vector<int32_t> ids;                    // kept candidates, id order
  std::vector<float> vals;                     // their weights
  std::vector<double> hist;                    // top-p mass histogram
  void fit(int64_t V) {
    if (static_cast<int64_t>(x.size()) != V) {
      x.resize(V);
      counts.assign(V, 0);
      seen.assign(V, 0);
      packed.resize(V + 8);
    }
  }
};

struct Inputs {
  int64_t V, N;
  const float *temperature, *top_p, *min_p, *rep, *pres, *freq;
  const int32_t* top_k;
  const int64_t *seeds, *steps;
  const int64_t *prompt, *output, *bias_ids;  // nullptr when absent
  const float* bias_vals;
  int64_t prompt_len, output_len, bias_len;
  bool masked;           // an allowed_token_bitmask was given
  const uint32_t* mask;  // [batch, mask_words] (null if mask_words == 0)
  int64_t mask_words;
  int64_t* sampled;
  float* sampled_lp;
  int64_t* top_ids;
  float* top_lp;
};

// Top-N of the raw logits (descending, ties to the lower id) with a running
// bar like kth_largest: after the buffer first holds N candidates, a later id
// enters only with a strictly larger logit (on a tie the earlier id wins).
void top_logprobs(const float* x, int64_t b, const Inputs& in, float m, float log_sum, Scratch& s) {
  const int64_t V = in.V, N = in.N;
  auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& c) {
    const float ka = key(a.first), kc = key(c.first);
    return ka > kc || (ka == kc && a.second < c.second);
  };
  auto& top = s.top;
  top.clear();
  const int64_t cap = std::max<int64_t>(2 * N, N + 256);
  int64_t i = 0;
  for (; i < std::min(V, cap); ++i) top.emplace_back(x[i], i);
  float bar = -kInf;
  auto prune = [&] {
    std::nth_element(top.begin(), top.begin() + (N - 1), top.end(), better);
    top.resize(N);
    bar = key(top[N - 1].first);
  };
  if (i < V) prune();
#ifdef PYSERVE_HAVE_AVX2
  for (; i + 8 <= V; i += 8) {
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(bar), _CMP_GT_OQ));
    if (!mask) continue;
    while (mask) {
      const int j = __builtin_ctz(mask);
      mask &= mask - 1;
      top.emplace_back(x[i + j], i + j);
    }
    if (static_cast<int64_t>(top.size()) >= cap) prune();
  }
#endif
  for (; i < V; ++i) {
    if (x[i] > bar) top.emplace_back(x[i], i);
    if (static_cast<int64_t>(top.size()) >= cap) prune();
  }
  std::sort(top.begin(), top.end(), better);
  // Order by the rounded logprob itself (two logits can round to one lp).
  for (auto& t : top) t.first = (t.first - m) - log_sum;
  std::stable_sort(top.begin(), top.begin() + N, better);
  for (int64_t j = 0; j < N; ++j) {
    in.top_ids[b * N + j] = top[j].second;
    in.top_lp[b * N + j] = top[j].first;
  }
}

template <typename Elem>
void sample_row(const Elem* row, int64_t b, const Inputs& in, Scratch& s) {
  const int64_t V = in.V;
  s.fit(V);
  float* x = s.x.data();

  // 1. Raw log-softmax statistics.
  const float m = load_row(row, x, V);
  const float log_sum = std::log(sum_exp(x, V, m));
  if (in.N > 0) top_logprobs(x, b, in, m, log_sum, s);

  // 5 (checked first). A row that allows no id samples -1; steps 2-4 have
  // not touched the scratch arrays yet, so skipping them keeps them clean.
  const Allowed allowed{in.masked, in.mask ? in.mask + b * in.mask_words : nullptr, in.mask_words};
  if (allowed.masked && allowed_end(allowed, V, /*first=*/true) < 0) {
    in.sampled[b] = -1;
    in.sampled_lp[b] = -kInf;
    return;
  }

  // 2. Logit bias, in list order (duplicates add up).
  bool modified = false;
  if (in.bias_ids) {
    const int64_t* ids = in.bias_ids + b * in.bias_len;
    const float* vals = in.bias_vals + b * in.bias_len;
    for (int64_t j = 0; j < in.bias_len; ++j)
      if (ids[j] >= 0 && ids[j] < V) {
        x[ids[j]] += vals[j];
        modified = true;
      }
  }
  // 3. Repetition penalty once per distinct id of prompt and output; `seen`
  // marks applied ids and is cleared by walking the same lists.
  const int64_t* prompt = in.prompt ? in.prompt + b * in.prompt_len : nullptr;
  const int64_t* output = in.output ? in.output + b * in.output_len : nullptr;
  const float r = in.rep[b];
  if (r != 1.f) {
    auto penalize = [&](const int64_t* list, int64_t len) {
      for (int64_t j = 0; j < len; ++j) {
        const int64_t id = list[j];
        if (id < 0 || id >= V || s.seen[id]) continue;
        s.seen[id] = 1;
        x[id] = x[id] > 0 ? x[id] / r : x[id] * r;
        modified = true;
      }
    };
    auto clear = [&](const int64_t* list, int64_t len) {
      for (int64_t j = 0; j < len; ++j)
        if (list[j] >= 0 && list[j] < V) s.seen[list[j]] = 0;
    };
    if (prompt) penalize(prompt, in.prompt_len);
    if (output) penalize(output, in.output_len);
    if (prompt) clear(prompt, in.prompt_len);
    if (output) clear(output, in.output_len);
  }
  // 4. Frequency / presence: count, then apply at each id's first occurrence
  // and zero its count (which also restores the all-zero invariant).
  const float freq = in.freq[b], pres = in.pres[b];
  if (output && (freq != 0.f || pres != 0.f)) {
    for (int64_t j = 0; j < in.output_len; ++j)
      if (output[j] >= 0 && output[j] < V) ++s.counts[output[j]];
    for (int64_t j = 0; j < in.output_len; ++j) {
      const int64_t id = output[j];
      if (id < 0 || id >= V || s.counts[id] == 0) continue;
      // Rounded product then sum, as written (this file builds with
      // -ffp-contract=off so no FMA sneaks in).
      const float penalty = freq * static_cast<float>(s.counts[id]) + pres;
      x[id] -= penalty;
      s.counts[id] = 0;
      modified = true;
    }
  }

  // 5. Allowed ids: disallowed logits -> -inf, the max over the allowed ones.
  const float xmax = allowed.masked ? mask_row(x, V, allowed) : modified ? row_max(x, V) : m;
  const float T = in.temperature[b];
  int64_t token;
  if (T <= kGreedyTemperature) {
    // 6. Greedy: the first id holding the maximum. A disallowed id holds it
    // only if every allowed logit is -inf (or the max is NaN): then the first
    // allowed id holding it, else the first allowed id, as over the sub-row.
    token = first_equal(x, V, xmax);
    if (!allowed(token)) {
      token = allowed_end(allowed, V, /*first=*/true);
      for (int64_t i = token; i < V; ++i)
        if (x[i] == xmax && allowed(i)) {
          token = i;
          break;
        }
    }
  } else {
    // 7. max(x / T) is xmax / T: correctly rounded division is monotone.
    compute_weights(x, V, T, xmax / T);
    if (allowed.masked && !(xmax > -kInf)) {
      // exp(-inf - max z) is NaN here, which the vector exp maps to a tiny
      // weight, not 0: keep the disallowed ids out explicitly.
      for (int64_t i = 0; i < V; ++i)
        if (!allowed(i)) x[i] = 0.f;
    }
    const float* w = x;
    const int32_t k = in.top_k[b];
    const float p = in.top_p[b], mp = in.min_p[b];
    const double u = uniform(in.seeds[b], in.steps[b]);
    float theta = 0.f;
    if (k >= 1 && k < V) {
      const float t_k = kth_largest(w, V, k, s.buf);
      collect_at_least(w, V, t_k, s.ids, s.vals);  // K, ties at t_k included
      theta = t_k;
      if (p < 1.f) {
        const float* kv = s.vals.data();
        theta = std::max(theta, top_p_threshold(
                                    static_cast<int64_t>(s.vals.size()), [kv](int64_t i) { return kv[i]; }, p,
                                    s.buf, s.hist));
      }
      if (mp > 0.f) theta = std::max(theta, mp);
      token = draw_list(s.ids, s.vals, theta, u, V, allowed);
    } else {
      if (p < 1.f) theta = top_p_threshold_row(w, V, p, s.packed.data(), s.buf, s.hist);
      if (mp > 0.f) theta = std::max(theta, mp);
      token = draw_full(w, V, theta, u, allowed);
    }
  }
  in.sampled[b] = token;
  in.sampled_lp[b] = (to_float(row[token]) - m) - log_sum;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& seeds, const at::Tensor& steps, const at::Tensor& repetition_penalty,
    const at::Tensor& presence_penalty, const at::Tensor& frequency_penalty,
    const c10::optional<at::Tensor>& prompt_token_ids, const c10::optional<at::Tensor>& output_token_ids,
    const c10::optional<at::Tensor>& logit_bias_ids, const c10::optional<at::Tensor>& logit_bias_values,
    int64_t num_top_logprobs, const c10::optional<at::Tensor>& allowed_token_bitmask) {
  check_sample(logits, temperature, top_k, top_p, min_p, seeds, steps, repetition_penalty, presence_penalty,
               frequency_penalty, prompt_token_ids, output_token_ids, logit_bias_ids, logit_bias_values,
               num_top_logprobs, allowed_token_bitmask);
  const int64_t B = logits.size(0), V = logits.size(1), N = num_top_logprobs;
  auto long_opts = logits.options().dtype(at::kLong);
  auto float_opts = logits.options().dtype(at::kFloat);
  at::Tensor sampled = at::empty({B}, long_opts);           // [B]
  at::Tensor sampled_lp = at::empty({B}, float_opts);       // [B]
  at::Tensor top_ids = at::empty({B, N}, long_opts);        // [B, N]
  at::Tensor top_lp = at::empty({B, N}, float_opts);        // [B, N]
  if (B == 0) return {sampled, sampled_lp, top_ids, top_lp};

  Inputs in{};
  in.V = V;
  in.N = N;
  in.temperature = temperature.data_ptr<float>();
  in.top_p = top_p.data_ptr<float>();
  in.min_p = min_p.data_ptr<float>();
  in.rep = repetition_penalty.data_ptr<float>();
  in.pres = presence_penalty.data_ptr<float>();
  in.freq = frequency_penalty.data_ptr<float>();
  in.top_k = top_k.data_ptr<int32_t>();
  in.seeds = seeds.data_ptr<int64_t>();
  in.steps = steps.data_ptr<int64_t>();
  auto ids_of = [](const c10::optional<at::Tensor>& t, int64_t& len) -> const int64_t* {
    len = t.has_value() ? t->size(1) : 0;
    return t.has_value() && len > 0 ? t->data_ptr<int64_t>() : nullptr;
  };
  in.prompt = ids_of(prompt_token_ids, in.prompt_len);
  in.output = ids_of(output_token_ids, in.output_len);
  in.bias_ids = ids_of(logit_bias_ids, in.bias_len);
  in.bias_vals = in.bias_ids ? logit_bias_values->data_ptr<float>() : nullptr;
  // The mask's int32 words read as uint32 (bit 31 is id 32 w + 31).
  in.masked = allowed_token_bitmask.has_value();
  in.mask_words = in.masked ? allowed_token_bitmask->size(1) : 0;
  in.mask = in.mask_words > 0 ? reinterpret_cast<const uint32_t*>(allowed_token_bitmask->data_ptr<int32_t>())
                              : nullptr;
  in.sampled = sampled.data_ptr<int64_t>();
  in.sampled_lp = sampled_lp.data_ptr<float>();
  in.top_ids = top_ids.data_ptr<int64_t>();
  in.top_lp = top_lp.data_ptr<float>();

  PYSERVE_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "sample", [&] {
    const scalar_t* data = logits.data_ptr<scalar_t>();
    // One row is already tens of microseconds at LLM vocab sizes: grain 1.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      // Per-thread scratch survives across calls so the O(V) arrays are
      // allocated (and zeroed) once per thread, not once per row.
      thread_local Scratch scratch;
      for (int64_t b = begin; b < end; ++b) sample_row<scalar_t>(data + b * V, b, in, scratch);
    });
  });
  return {sampled, sampled_lp, top_ids, top_lp};
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY
