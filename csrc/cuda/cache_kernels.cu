// CUDA KV-cache ops: scatter new K/V rows into the paged cache, derive slots
// from block tables, copy blocks for copy-on-write.
//
// The copies are dtype-agnostic byte moves in the widest unit (up to 16 bytes)
// that divides every pointer, stride and row size involved. Invalid indices
// (slots or block ids outside the cache) are skipped on the device instead of
// raising, since checking them on the host would need a device->host sync.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "cuda/common.cuh"
#include "ops.h"
#include "validate.h"

namespace pyserve::cuda {
namespace {

// One thread block per token; copies the dense [num_kv_heads, head_dim] row of
// key and value into the cache slot. Sizes and strides are in kUnit-byte units.
template <int kUnit>
__global__ void reshape_and_cache_kernel(const char* __restrict__ key, const char* __restrict__ value,
                                         char* __restrict__ key_cache, char* __restrict__ value_cache,
                                         const int64_t* __restrict__ slot_mapping, int64_t key_stride,
                                         int64_t value_stride, int64_t row_units, int64_t num_slots) {
  using U = typename CopyType<kUnit>::type;
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;  // -1 = padding; out of range = skipped
  const U* k = reinterpret_cast<const U*>(key) + token * key_stride;
  const U* v = reinterpret_cast<const U*>(value) + token * value_stride;
  U* kc = reinterpret_cast<U*>(key_cache) + slot * row_units;
  U* vc = reinterpret_cast<U*>(value_cache) + slot * row_units;
  for (int64_t i = threadIdx.x; i < row_units; i += blockDim.x) {
    kc[i] = k[i];
    vc[i] = v[i];
  }
}

__global__ void compute_slot_mapping_kernel(const int32_t* __restrict__ block_tables,
                                            const int32_t* __restrict__ seq_lens,
                                            const int32_t* __restrict__ query_start_loc, int64_t num_seqs,
                                            int64_t max_blocks, int64_t block_size, int64_t num_tokens,
                                            int64_t* __restrict__ slot_mapping, int64_t* __restrict__ positions) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= num_tokens) return;
  int64_t slot = -1, pos = 0;
  if (num_seqs > 0 && t >= query_start_loc[0] && t < query_start_loc[num_seqs]) {
    // Last s in [0, num_seqs) with query_start_loc[s] <= t (upper_bound - 1).
    int64_t lo = 0, hi = num_seqs;  // answer in [lo, hi)
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (query_start_loc[mid] <= t) lo = mid; else hi = mid;
    }
    const int64_t s = lo;
    const int64_t q_begin = query_start_loc[s], q_len = query_start_loc[s + 1] - q_begin;
    const int64_t p = static_cast<int64_t>(seq_lens[s]) - q_len + (t - q_begin);
    if (p >= 0) {
      pos = p;
      const int64_t b = p / block_size;
      if (b < max_blocks) {
        const int64_t block = block_tables[s * max_blocks + b];
        if (block >= 0) slot = block * block_size + p % block_size;
      }
    }
  }
  slot_mapping[t] = slot;
  positions[t] = pos;
}

// Grid (num_pairs, 2): y = 0 copies the key cache block, y = 1 the value block.
template <int kUnit>
__global__ void copy_blocks_kernel(char* __restrict__ key_cache, char* __restrict__ value_cache,
                                   const int64_t* __restrict__ block_mapping, int64_t num_blocks,
                                   int64_t block_units) {
  using U = typename CopyType<kUnit>::type;
  const int64_t pair = blockIdx.x;
  const int64_t src = block_mapping[2 * pair], dst = block_mapping[2 * pair + 1];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks || src == dst) return;
  U* cache = reinterpret_cast<U*>(blockIdx.y == 0 ? key_cache : value_cache);
  const U* from = cache + src * block_units;
  U* to = cache + dst * block_units;
  for (int64_t i = threadIdx.x; i < block_units; i += blockDim.x) to[i] = from[i];
}

}  // namespace

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                       const at::Tensor& slot_mapping) {
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  check_cache_dtype_pair(key, "key", key_cache, /*allow_mixed=*/false);
  const int64_t num_tokens = key.size(0);
  if (num_tokens == 0 || key_cache.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const int64_t es = key.element_size();
  const int64_t row_bytes = key.size(1) * key.size(2) * es;
  if (row_bytes == 0) return;
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t k_stride_bytes = key.stride(0) * es, v_stride_bytes = value.stride(0) * es;
  int unit = copy_unit(reinterpret_cast<std::uintptr_t>(key.data_ptr()), reinterpret_cast<std::uintptr_t>(value.data_ptr()),
                       reinterpret_cast<std::uintptr_t>(key_cache.data_ptr()) | reinterpret_cast<std::uintptr_t>(value_cache.data_ptr()),
                       static_cast<std::uintptr_t>(row_bytes | k_stride_bytes | v_stride_bytes));
  const int64_t row_units = row_bytes / unit;
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, row_units)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_copy_unit(unit, [&]<int kUnit>() {
    reshape_and_cache_kernel<kUnit><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
        static_cast<const char*>(key.data_ptr()), static_cast<const char*>(value.data_ptr()),
        static_cast<char*>(key_cache.data_ptr()), static_cast<char*>(value_cache.data_ptr()),
        slot_mapping.data_ptr<int64_t>(), k_stride_bytes / kUnit, v_stride_bytes / kUnit, row_units, num_slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> compute_slot_mapping(const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                                        const at::Tensor& query_start_loc, int64_t block_size,
                                                        int64_t num_tokens) {
  check_compute_slot_mapping(block_tables, seq_lens, query_start_loc, block_size, num_tokens);
  auto opts = block_tables.options().dtype(at::kLong);
  at::Tensor slot_mapping = at::empty({num_tokens}, opts);
  at::Tensor positions = at::empty({num_tokens}, opts);
  if (num_tokens == 0) return {slot_mapping, positions};
  const c10::cuda::CUDAGuard guard(block_tables.device());
  const int threads = 256;
  const int64_t blocks = (num_tokens + threads - 1) / threads;
  compute_slot_mapping_kernel<<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), query_start_loc.data_ptr<int32_t>(),
      seq_lens.size(0), block_tables.size(1), block_size, num_tokens, slot_mapping.data_ptr<int64_t>(),
      positions.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {slot_mapping, positions};
}

void copy_blocks(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& block_mapping) {
  check_copy_blocks(key_cache, value_cache, block_mapping);
  const int64_t num_pairs = block_mapping.size(0);
  if (num_pairs == 0 || key_cache.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const int64_t block_bytes = key_cache.stride(0) * key_cache.element_size();
  const int unit = copy_unit(reinterpret_cast<std::uintptr_t>(key_cache.data_ptr()),
                             reinterpret_cast<std::uintptr_t>(value_cache.data_ptr()),
                             static_cast<std::uintptr_t>(block_bytes), 16);
  const int64_t block_units = block_bytes / unit;
  const int threads = static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, block_units)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_copy_unit(unit, [&]<int kUnit>() {
    copy_blocks_kernel<kUnit><<<dim3(static_cast<unsigned>(num_pairs), 2), threads, 0, stream>>>(
        static_cast<char*>(key_cache.data_ptr()), static_cast<char*>(value_cache.data_ptr()),
        block_mapping.data_ptr<int64_t>(), key_cache.size(0), block_units);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace pyserve::cuda
