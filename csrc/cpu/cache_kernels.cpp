// CPU KV-cache ops: scatter new K/V rows into the paged cache, derive slots
// from block tables, copy blocks for copy-on-write.
#include "dispatch.h"
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cstring>

#include "ops.h"
#include "validate.h"

namespace pyserve::cpu {

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                       const at::Tensor& slot_mapping) {
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  check_cache_dtype_pair(key, "key", key_cache, /*allow_mixed=*/true);
  const int64_t num_tokens = key.size(0);
  const int64_t row = key.size(1) * key.size(2);  // num_kv_heads * head_dim
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slots[t] >= -1 && slots[t] < num_slots, "slot_mapping[", t, "] = ", slots[t],
                " is outside the cache (", num_slots, " slots; -1 = padding)");
  }
  const int64_t k_stride = key.stride(0), v_stride = value.stride(0);
  if (key.scalar_type() == key_cache.scalar_type()) {
    PYSERVE_DISPATCH_FLOAT_TYPES(key.scalar_type(), "reshape_and_cache", [&] {
      const scalar_t* k = key.data_ptr<scalar_t>();
      const scalar_t* v = value.data_ptr<scalar_t>();
      scalar_t* kc = key_cache.data_ptr<scalar_t>();
      scalar_t* vc = value_cache.data_ptr<scalar_t>();
      at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          if (slots[t] < 0) continue;
          std::memcpy(kc + slots[t] * row, k + t * k_stride, row * sizeof(scalar_t));
          std::memcpy(vc + slots[t] * row, v + t * v_stride, row * sizeof(scalar_t));
        }
      });
    });
    return;
  }
  // An fp32 key/value into a bf16 or fp16 cache (check_cache_dtype_pair lets
  // nothing else through): c10's conversions round to nearest even, as
  // torch's .to(dtype) does. Scalar code compiled once, for the baseline ISA:
  // a step writes only its new tokens' rows, a sliver next to its matmuls.
  const float* k = key.data_ptr<float>();
  const float* v = value.data_ptr<float>();
  PYSERVE_DISPATCH_FLOAT_TYPES(key_cache.scalar_type(), "reshape_and_cache", [&] {
    scalar_t* kc = key_cache.data_ptr<scalar_t>();
    scalar_t* vc = value_cache.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (slots[t] < 0) continue;
        for (int64_t i = 0; i < row; ++i) {
          kc[slots[t] * row + i] = static_cast<scalar_t>(k[t * k_stride + i]);
          vc[slots[t] * row + i] = static_cast<scalar_t>(v[t * v_stride + i]);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> compute_slot_mapping(const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                                        const at::Tensor& query_start_loc, int64_t block_size,
                                                        int64_t num_tokens) {
  check_compute_slot_mapping(block_tables, seq_lens, query_start_loc, block_size, num_tokens);
  auto opts = block_tables.options().dtype(at::kLong);
  at::Tensor slot_mapping = at::empty({num_tokens}, opts);
  at::Tensor positions = at::empty({num_tokens}, opts);
  int64_t* slots = slot_mapping.data_ptr<int64_t>();
  int64_t* pos = positions.data_ptr<int64_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int64_t num_seqs = seq_lens.size(0), max_blocks = block_tables.size(1);
  TORCH_CHECK(qsl[0] == 0, "query_start_loc[0] must be 0, got ", qsl[0]);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_begin = qsl[s], q_end = qsl[s + 1], q_len = q_end - q_begin;
    TORCH_CHECK(q_len >= 0 && q_end <= num_tokens, "query_start_loc must be non-decreasing and end at most at num_tokens=",
                num_tokens, "; entries ", s, ", ", s + 1, " are ", q_begin, ", ", q_end);
    TORCH_CHECK(lens[s] >= q_len && lens[s] <= max_blocks * block_size, "seq_lens[", s, "] = ", lens[s],
                " must be between its ", q_len, " new tokens and the block table's capacity ", max_blocks * block_size);
    const int64_t first_pos = lens[s] - q_len;
    for (int64_t j = 0; j < q_len; ++j) {
      const int64_t p = first_pos + j;
      pos[q_begin + j] = p;
      slots[q_begin + j] = int64_t(tables[s * max_blocks + p / block_size]) * block_size + p % block_size;
    }
  }
  for (int64_t t = qsl[num_seqs]; t < num_tokens; ++t) {
    slots[t] = -1;
    pos[t] = 0;
  }
  return {slot_mapping, positions};
}

void copy_blocks(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& block_mapping) {
  check_copy_blocks(key_cache, value_cache, block_mapping);
  const int64_t num_pairs = block_mapping.size(0), num_blocks = key_cache.size(0);
  const int64_t* pairs = block_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < 2 * num_pairs; ++i) {
    TORCH_CHECK(pairs[i] >= 0 && pairs[i] < num_blocks, "block_mapping[", i / 2, "][", i % 2, "] = ", pairs[i],
                " is not a block id in [0, ", num_blocks, ")");
  }
  const int64_t block_bytes = key_cache.stride(0) * key_cache.element_size();
  char* kc = static_cast<char*>(key_cache.data_ptr());
  char* vc = static_cast<char*>(value_cache.data_ptr());
  at::parallel_for(0, num_pairs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t src = pairs[2 * i], dst = pairs[2 * i + 1];
      if (src == dst) continue;
      std::memcpy(kc + dst * block_bytes, kc + src * block_bytes, block_bytes);
      std::memcpy(vc + dst * block_bytes, vc + src * block_bytes, block_bytes);
    }
  });
}

}  // namespace pyserve::cpu
