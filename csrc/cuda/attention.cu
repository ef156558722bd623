// CUDA paged attention for a mixed (varlen) batch of prefill chunks and
// decodes, split-K over the keys ("paged attention v2").
//
// Kernel 1, grid (query row, query head, partition), 4 warps: the CTA finds
// its sequence by a binary search over query_start_loc, then covers keys
// [part * part_size, min(kv_len, (part + 1) * part_size)) of that sequence
// (the last partition also takes anything past num_partitions * part_size, so
// an underestimated max_seq_len costs speed, never correctness). Each warp
// takes tiles of 32 keys: lane j computes the score of key j (16-byte loads of
// the K row, q in shared memory), the warp does one online-softmax rescale per
// tile, then accumulates the weighted V rows with lane = head dim (strided by
// 32, bounds-checked so 80 and 112 work). The 4 warp states are merged through
// shared memory. With a single partition the CTA normalises and writes the
// output directly; otherwise it stores (max, sum, unnormalised acc) and
// kernel 2, grid (row, head), merges the partitions with log-sum-exp
// rescaling. Padding rows (and rows of sequences with nothing to attend to)
// produce zeros. Math is fp32 whatever the storage dtype.
//
// Sliding window W > 0: the row at position p covers keys
// [max(0, p - W + 1), p] instead of [0, p]; partitions split that range (so
// a windowed decode reads W keys, not p + 1) and the host sizes them by
// min(max_seq_len, W). Soft-cap c > 0: each score s becomes c * tanh(s / c)
// right after its dot product. The kernel is instantiated twice per (dtype,
// head_dim): kExtras = false, used when neither option is on, compiles to the
// kernel as it was before them (window 0 and no cap are constants there, and
// ptxas allocates registers as before); kExtras = true reads both from the
// parameters.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>

#include "cuda/common.cuh"
#include "dispatch.h"
#include "ops.h"
#include "validate.h"

namespace pyserve::cuda {
namespace {

constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * kWarpSize;
constexpr int64_t kPartitionSize = 512;     // keys per partition when the work is small
constexpr int64_t kTargetCtas = 2048;       // split only while the grid is smaller than this
constexpr int64_t kMaxWorkspaceBytes = 256ll << 20;

template <typename T>
struct AttnParams {
  const T* query;
  const T* key_cache;
  const T* value_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  const int32_t* query_start_loc;
  T* out;
  float* ws_acc;  // [num_tokens, num_heads, num_parts, head_dim]
  float* ws_max;  // [num_tokens, num_heads, num_parts]
  float* ws_sum;  // [num_tokens, num_heads, num_parts]
  int64_t q_token_stride;
  int64_t num_tokens;
  int64_t max_blocks;
  int64_t num_blocks;
  int64_t part_size;
  int num_seqs;
  int num_heads;
  int num_kv_heads;
  int group;
  int block_size;
  int num_parts;
  int64_t window;  // > 0: sliding window in keys; 0: off
  float scale;
  float soft_cap;      // > 0: logit soft-cap; 0: off
  float inv_soft_cap;  // 1 / soft_cap
};

// Finds the sequence of a query row and the keys it sees, [kv_lo, kv_len):
// kv_len is its position + 1, capped by its block table's capacity; kv_lo is
// 0, or with a window W > 0 its position - W + 1 (at least 0). False for
// padding rows and rows with nothing to attend to.
__device__ __forceinline__ bool locate_row(const int32_t* __restrict__ qsl, const int32_t* __restrict__ seq_lens,
                                           int num_seqs, int64_t row, int64_t capacity, int64_t window, int64_t& seq,
                                           int64_t& kv_lo, int64_t& kv_len) {
  if (num_seqs <= 0 || row < qsl[0] || row >= qsl[num_seqs]) return false;
  int lo = 0, hi = num_seqs;  // last s with qsl[s] <= row lies in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (qsl[mid] <= row) lo = mid; else hi = mid;
  }
  const int64_t q_begin = qsl[lo], q_len = qsl[lo + 1] - q_begin;
  const int64_t pos = static_cast<int64_t>(seq_lens[lo]) - q_len + (row - q_begin);
  kv_len = std::min<int64_t>(pos + 1, capacity);
  kv_lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
  seq = lo;
  return kv_len > kv_lo;
}

template <typename T, int D, bool kExtras>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(const AttnParams<T> p) {
  constexpr int kDimsPerLane = (D + kWarpSize - 1) / kWarpSize;
  constexpr int kVec = 16 / sizeof(T);
  static_assert(D % kVec == 0, "K rows are read in 16-byte chunks");
  __shared__ float q_s[D];
  __shared__ float red_m[kNumWarps];
  __shared__ float red_l[kNumWarps];
  __shared__ float red_acc[kNumWarps][D];

  const int64_t row = blockIdx.x;
  const int head = blockIdx.y;
  const int part = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const bool direct = p.num_parts == 1;
  const int64_t out_off = (row * p.num_heads + head) * D;

  int64_t seq = 0, kv_lo = 0, kv_len = 0;
  if (!locate_row(p.query_start_loc, p.seq_lens, p.num_seqs, row, p.max_blocks * p.block_size,
                  kExtras ? p.window : 0, seq, kv_lo, kv_len)) {
    if (direct) {
      for (int d = threadIdx.x; d < D; d += kThreads) p.out[out_off + d] = from_float<T>(0.f);
    }
    return;  // with several partitions the merge kernel writes the zeros
  }
  const int64_t start = kv_lo + part * p.part_size;
  if (start >= kv_len) return;  // partition past this row's keys (never with direct)
  const int64_t end = part == p.num_parts - 1 ? kv_len : std::min(kv_len, start + p.part_size);

  const T* q = p.query + row * p.q_token_stride + static_cast<int64_t>(head) * D;
  for (int d = threadIdx.x; d < D; d += kThreads) q_s[d] = to_float(q[d]) * p.scale;
  __syncthreads();

  const int kv_head = head / p.group;
  const int64_t token_stride = static_cast<int64_t>(p.num_kv_heads) * D;  // between slots
  const T* k_base = p.key_cache + static_cast<int64_t>(kv_head) * D;
  const T* v_base = p.value_cache + static_cast<int64_t>(kv_head) * D;
  const int32_t* table = p.block_tables + seq * p.max_blocks;

  float m = -INFINITY, l = 0.f;
  float acc[kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) acc[i] = 0.f;

  for (int64_t tile = start + warp * kWarpSize; tile < end; tile += kNumWarps * kWarpSize) {
    const int64_t k = tile + lane;
    float s = -INFINITY;
    int64_t off = -1;  // element offset of key k's row (relative to k_base / v_base)
    if (k < end) {
      const int64_t block = table[k / p.block_size];
      if (block >= 0 && block < p.num_blocks) {
        off = (block * p.block_size + k % p.block_size) * token_stride;
        const T* k_row = k_base + off;
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < D; c += kVec) {
          alignas(16) T tmp[kVec];
          *reinterpret_cast<uint4*>(tmp) = *reinterpret_cast<const uint4*>(k_row + c);
#pragma unroll
          for (int i = 0; i < kVec; ++i) dot += q_s[c + i] * to_float(tmp[i]);
        }
        s = dot;
        if constexpr (kExtras) {
          if (p.soft_cap > 0.f) s = p.soft_cap * tanhf(dot * p.inv_soft_cap);
        }
      }
    }
    const float tile_max = warp_max(s);
    if (tile_max == -INFINITY) continue;  // warp-uniform: no readable key in this tile
    const float m_new = fmaxf(m, tile_max);
    const float alpha = expf(m - m_new);  // 0 while m is still -inf
    const float prob = off >= 0 ? expf(s - m_new) : 0.f;
    l = l * alpha + warp_sum(prob);
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[i] *= alpha;
    const int n = static_cast<int>(std::min<int64_t>(kWarpSize, end - tile));
    for (int j = 0; j < n; ++j) {
      const float pj = __shfl_sync(0xffffffffu, prob, j);
      const long long oj = __shfl_sync(0xffffffffu, static_cast<long long>(off), j);
      if (oj < 0) continue;  // warp-uniform
      const T* v_row = v_base + oj;
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) {
        const int d = lane + i * kWarpSize;
        if (D % kWarpSize == 0 || d < D) acc[i] += pj * to_float(v_row[d]);
      }
    }
    m = m_new;
  }

  // Merge the warps' (m, l, acc).
  if (lane == 0) {
    red_m[warp] = m;
    red_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int d = lane + i * kWarpSize;
    if (D % kWarpSize == 0 || d < D) red_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float m_all = -INFINITY;
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) m_all = fmaxf(m_all, red_m[w]);
  float weight[kNumWarps];
  float l_all = 0.f;
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) {
    weight[w] = red_m[w] == -INFINITY ? 0.f : expf(red_m[w] - m_all);
    l_all += weight[w] * red_l[w];
  }
  if (direct) {
    const float inv = l_all > 0.f ? 1.f / l_all : 0.f;
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float a = 0.f;
#pragma unroll
      for (int w = 0; w < kNumWarps; ++w) a += weight[w] * red_acc[w][d];
      p.out[out_off + d] = from_float<T>(a * inv);
    }
  } else {
    const int64_t ws = (row * p.num_heads + head) * p.num_parts + part;
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float a = 0.f;
#pragma unroll
      for (int w = 0; w < kNumWarps; ++w) a += weight[w] * red_acc[w][d];
      p.ws_acc[ws * D + d] = a;
    }
    if (threadIdx.x == 0) {
      p.ws_max[ws] = m_all;
      p.ws_sum[ws] = l_all;
    }
  }
}

// Grid (row, head): merges the row's partitions. Linear in the partition count.
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_partitions_kernel(const AttnParams<T> p, int head_dim) {
  const int64_t row = blockIdx.x;
  const int head = blockIdx.y;
  T* out = p.out + (row * p.num_heads + head) * head_dim;
  int64_t seq = 0, kv_lo = 0, kv_len = 0;
  if (!locate_row(p.query_start_loc, p.seq_lens, p.num_seqs, row, p.max_blocks * p.block_size, p.window, seq, kv_lo,
                  kv_len)) {
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) out[d] = from_float<T>(0.f);
    return;
  }
  const int n_parts =
      static_cast<int>(std::min<int64_t>(p.num_parts, (kv_len - kv_lo + p.part_size - 1) / p.part_size));
  const int64_t base = (row * p.num_heads + head) * p.num_parts;
  float m_all = -INFINITY;
  for (int i = 0; i < n_parts; ++i) m_all = fmaxf(m_all, p.ws_max[base + i]);
  float l_all = 0.f;
  for (int i = 0; i < n_parts; ++i) {
    const float mi = p.ws_max[base + i];
    if (mi != -INFINITY) l_all += expf(mi - m_all) * p.ws_sum[base + i];
  }
  const float inv = l_all > 0.f ? 1.f / l_all : 0.f;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float a = 0.f;
    for (int i = 0; i < n_parts; ++i) {
      const float mi = p.ws_max[base + i];
      if (mi != -INFINITY) a += expf(mi - m_all) * p.ws_acc[(base + i) * head_dim + d];
    }
    out[d] = from_float<T>(a * inv);
  }
}

template <typename T, int D>
void launch(const AttnParams<T>& p, int64_t num_tokens, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(p.num_heads),
                  static_cast<unsigned>(p.num_parts));
  if (p.window > 0 || p.soft_cap > 0.f) {
    paged_attention_kernel<T, D, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    paged_attention_kernel<T, D, false><<<grid, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_parts > 1) {
    merge_partitions_kernel<T><<<dim3(grid.x, grid.y), kThreads, 0, stream>>>(p, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale, int64_t max_seq_len,
                           std::optional<int64_t> sliding_window, std::optional<double> logits_soft_cap) {
  check_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, max_seq_len,
                        sliding_window, logits_soft_cap);
  check_cache_dtype_pair(query, "query", key_cache, /*allow_mixed=*/false);
  const int64_t window = std::max<int64_t>(0, sliding_window.value_or(0));
  const float soft_cap = static_cast<float>(std::max(0.0, logits_soft_cap.value_or(0.0)));
  const int64_t num_tokens = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  at::Tensor out = at::empty({num_tokens, num_heads, head_dim}, query.options());
  if (num_tokens == 0 || num_heads == 0) return out;
  const c10::cuda::CUDAGuard guard(query.device());
  TORCH_CHECK(num_heads <= 65535, "paged_attention supports at most 65535 query heads, got ", num_heads);
  TORCH_CHECK(num_tokens <= 0x7fffffffll, "paged_attention supports at most 2^31 - 1 query rows, got ", num_tokens);
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(key_cache.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<std::uintptr_t>(value_cache.data_ptr()) % 16 == 0,
              "paged_attention needs 16-byte aligned key_cache and value_cache");
  TORCH_CHECK(key_cache.size(1) <= 0x7fffffffll && seq_lens.size(0) <= 0x7fffffffll,
              "block_size and num_seqs must fit in int32");

  // Split-K sizing from max_seq_len alone (no device->host sync): partitions
  // of kPartitionSize keys, fewer when the grid already has plenty of CTAs or
  // the workspace would grow past kMaxWorkspaceBytes. A row sees at most
  // `window` keys.
  const int64_t rows_heads = num_tokens * num_heads;
  const int64_t max_len = std::max<int64_t>(window > 0 ? std::min(max_seq_len, window) : max_seq_len, 1);
  int64_t num_parts = (max_len + kPartitionSize - 1) / kPartitionSize;
  num_parts = std::min(num_parts, std::max<int64_t>(1, (kTargetCtas + rows_heads - 1) / rows_heads));
  num_parts = std::min(num_parts,
                       std::max<int64_t>(1, kMaxWorkspaceBytes / (rows_heads * (head_dim + 2) * int64_t(sizeof(float)))));
  num_parts = std::min<int64_t>(num_parts, 65535);
  int64_t part_size = (max_len + num_parts - 1) / num_parts;
  part_size = (part_size + kWarpSize - 1) / kWarpSize * kWarpSize;

  at::Tensor workspace;
  if (num_parts > 1) {
    workspace = at::empty({rows_heads * num_parts * (head_dim + 2)}, query.options().dtype(at::kFloat));
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();

  PYSERVE_DISPATCH_FLOAT_TYPES(query.scalar_type(), "paged_attention", [&] {
    AttnParams<scalar_t> p;
    p.query = query.data_ptr<scalar_t>();
    p.key_cache = key_cache.data_ptr<scalar_t>();
    p.value_cache = value_cache.data_ptr<scalar_t>();
    p.block_tables = block_tables.data_ptr<int32_t>();
    p.seq_lens = seq_lens.data_ptr<int32_t>();
    p.query_start_loc = query_start_loc.data_ptr<int32_t>();
    p.out = out.data_ptr<scalar_t>();
    if (num_parts > 1) {
      float* ws = workspace.data_ptr<float>();
      p.ws_acc = ws;
      p.ws_max = ws + rows_heads * num_parts * head_dim;
      p.ws_sum = p.ws_max + rows_heads * num_parts;
    } else {
      p.ws_acc = p.ws_max = p.ws_sum = nullptr;
    }
    p.q_token_stride = query.stride(0);
    p.num_tokens = num_tokens;
    p.max_blocks = block_tables.size(1);
    p.num_blocks = key_cache.size(0);
    p.part_size = part_size;
    p.num_seqs = static_cast<int>(seq_lens.size(0));
    p.num_heads = static_cast<int>(num_heads);
    p.num_kv_heads = static_cast<int>(key_cache.size(2));
    p.group = static_cast<int>(num_heads / key_cache.size(2));
    p.block_size = static_cast<int>(key_cache.size(1));
    p.num_parts = static_cast<int>(num_parts);
    p.scale = static_cast<float>(scale);
    p.window = window;
    p.soft_cap = soft_cap;
    p.inv_soft_cap = soft_cap > 0.f ? 1.f / soft_cap : 0.f;
    switch (head_dim) {
      case 32: launch<scalar_t, 32>(p, num_tokens, stream); break;
      case 64: launch<scalar_t, 64>(p, num_tokens, stream); break;
      case 80: launch<scalar_t, 80>(p, num_tokens, stream); break;
      case 96: launch<scalar_t, 96>(p, num_tokens, stream); break;
      case 112: launch<scalar_t, 112>(p, num_tokens, stream); break;
      case 128: launch<scalar_t, 128>(p, num_tokens, stream); break;
      case 256: launch<scalar_t, 256>(p, num_tokens, stream); break;
      default: TORCH_CHECK(false, "unsupported head_dim ", head_dim);
    }
  });
  return out;
}

}  // namespace pyserve::cuda
