// CPU paged attention for a mixed batch of prefill chunks and decodes.
//
// Work item = (sequence, tile of query tokens with up to kTileRows rows of
// token x head). All heads and tokens of the tile are processed together, so
// each cached K/V block is read once per tile, front to back, instead of once
// per query head and token. Keys are consumed a cache block at a time with an
// online softmax (flash-attention style): scores for the block, one rescale of
// the accumulators, then the weighted V rows. Math is fp32 whatever the
// storage dtype. The cache may have another dtype than the query (a bf16 or
// fp16 cache under an fp32 model, --kv-cache-dtype): its rows are widened to
// fp32 as they are loaded, so only the bytes streamed from memory change.
//
// Sliding window (window W > 0): the row at position p sees keys
// max(0, p - W + 1) .. p, so a work item starts at the block of its first
// row's first key and each row consumes only its own key range (which may
// begin and end inside a block). Soft-cap (cap > 0): the scaled scores of a
// row's range go through cap * tanh(s / cap) before the max and the exps.
// With neither, the loops do exactly what they did before these existed.
#include "dispatch.h"
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/vec.h"
#include "ops.h"
#include "validate.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY {
namespace {

// Rows (query token x query head) handled by one work item.
constexpr int64_t kTileRows = 64;
// Keys per online-softmax update (rounded down to whole blocks): amortizes
// the rescale of the accumulators and the scalar exp over more keys.
constexpr int64_t kChunkKeys = 64;

struct WorkItem {
  int64_t seq;
  int64_t first_token;  // flat row index into query
  int64_t num_tokens;
};

struct Geometry {
  int64_t num_heads, num_kv_heads, group, head_dim, block_size, max_blocks, num_blocks;
  int64_t q_token_stride, out_token_stride;
  int64_t window;  // > 0: sliding window in keys; 0: off
  float scale;
  float soft_cap;  // > 0: logit soft-cap; 0: off
};

// T: query and output dtype; C: cache dtype (T itself, or bf16/fp16 under fp32).
template <typename T, typename C>
void attend_item(const WorkItem& item, int64_t kv_begin, int64_t kv_end, const Geometry& g, const T* query,
                 const C* key_cache, const C* value_cache, const int32_t* block_table, int64_t first_pos, T* out,
                 std::vector<float>& scratch) {
  const int64_t D = g.head_dim;
  const int64_t heads = (kv_end - kv_begin) * g.group;  // query heads of this unit
  const int64_t head0 = kv_begin * g.group;
  const int64_t rows = item.num_tokens * heads;  // row r = t * heads + (h - head0)
  // scratch: q [rows, D] | acc [rows, D] | m [rows] | l [rows] | scores [keys per chunk]
  scratch.resize(2 * rows * D + 2 * rows + std::max(kChunkKeys, g.block_size));
  float* q = scratch.data();
  float* acc = q + rows * D;
  float* m = acc + rows * D;
  float* l = m + rows;
  float* scores = l + rows;

  for (int64_t t = 0; t < item.num_tokens; ++t) {
    const T* src = query + (item.first_token + t) * g.q_token_stride + head0 * D;
    for (int64_t i = 0; i < heads * D; ++i) q[t * heads * D + i] = to_float(src[i]) * g.scale;
  }
  std::fill(acc, acc + rows * D, 0.f);
  std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
  std::fill(l, l + rows, 0.f);

  // The tile's last token sees the most keys; each row stops at its own
  // position. With a window the tile's first token has the lowest first key.
  const int64_t kv_len = first_pos + item.num_tokens;
  const int64_t kv_lo = g.window > 0 ? std::max<int64_t>(0, first_pos - g.window + 1) : 0;
  const int64_t token_stride = g.num_kv_heads * D;  // between consecutive slots of a block
  const int64_t num_kv_blocks = (kv_len + g.block_size - 1) / g.block_size;
  const int64_t first_block = kv_lo / g.block_size;
  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkKeys / g.block_size);
  // The unit's span of one block, from its first KV head's first slot to its
  // last KV head's last slot: what the prefetcher must bring in per block.
  const int64_t span_bytes = ((g.block_size - 1) * token_stride + (kv_end - kv_begin) * D) * sizeof(C);
  const int64_t row_steps = (kv_end - kv_begin) * item.num_tokens * g.group;
  auto block_ptr = [&](const C* cache, int64_t b, int64_t kvh) {
    return cache + block_table[b] * g.block_size * token_stride + kvh * D;
  };

  for (int64_t b0 = first_block; b0 < num_kv_blocks; b0 += chunk_blocks) {
    const int64_t b1 = std::min(num_kv_blocks, b0 + chunk_blocks);
    const int64_t p1 = std::min(num_kv_blocks, b1 + chunk_blocks);
    for (int64_t b = b0; b < p1; ++b) {
      TORCH_CHECK(block_table[b] >= 0 && block_table[b] < g.num_blocks, "block_tables[", item.seq, "][", b,
                  "] = ", block_table[b], " is not a block id in [0, ", g.num_blocks, ")");
    }
    // Blocks are scattered in memory, which defeats the hardware prefetcher
    // at every block boundary, so we prefetch the next chunk's blocks
    // ourselves, spread over this chunk's rows: issued in one burst they fill
    // the miss buffers and stall the core instead of overlapping compute.
    const int64_t prefetch_total = (p1 - b1) * span_bytes;
    const int64_t prefetch_step = ((prefetch_total / row_steps) / 64 + 1) * 64;
    int64_t prefetched = 0;
    auto prefetch_some = [&] {
      const int64_t end = std::min(prefetch_total, prefetched + prefetch_step);
      while (prefetched < end) {
        const int64_t b = b1 + prefetched / span_bytes, off = prefetched % span_bytes;
        const int64_t n = std::min(end - prefetched, span_bytes - off);
        prefetch_bytes(reinterpret_cast<const char*>(block_ptr(key_cache, b, kv_begin)) + off, n);
        prefetch_bytes(reinterpret_cast<const char*>(block_ptr(value_cache, b, kv_begin)) + off, n);
        prefetched += n;
      }
    };

    for (int64_t kvh = kv_begin; kvh < kv_end; ++kvh) {
      for (int64_t t = 0; t < item.num_tokens; ++t) {
        // Causal: the row at position p sees keys 0..p, or with a window
        // p - W + 1..p; here the part of them inside this chunk, [k_lo, k_hi).
        const int64_t p = first_pos + t;
        const int64_t row_lo = g.window > 0 ? std::max<int64_t>(0, p - g.window + 1) : 0;
        const int64_t k_lo = std::max(row_lo, b0 * g.block_size);
        const int64_t k_hi = std::min(p + 1, b1 * g.block_size);
        const int64_t visible = k_hi - k_lo;
        if (visible <= 0) continue;
        // The range starts at slot `off0` of block `blk0`: 0 and b0 unless a
        // window starts inside this chunk (no division on the common path).
        const int64_t blk0 = k_lo == b0 * g.block_size ? b0 : k_lo / g.block_size;
        const int64_t off0 = k_lo - blk0 * g.block_size;
        for (int64_t h = kvh * g.group; h < (kvh + 1) * g.group; ++h) {
          const int64_t r = t * heads + (h - head0);
          prefetch_some();
          for (int64_t b = blk0, off = off0, seen = 0; seen < visible; ++b, off = 0) {
            const int64_t n = std::min(g.block_size - off, visible - seen);
            dot_rows(q + r * D, block_ptr(key_cache, b, kvh) + off * token_stride, token_stride, n, D, scores + seen);
            seen += n;
          }
          if (g.soft_cap > 0.f) soft_cap_inplace(scores, visible, g.soft_cap);
          const float new_max = std::max(m[r], max_of(scores, visible));
          const float alpha = std::exp(m[r] - new_max);  // 0 on the row's first chunk (m = -inf)
          const float chunk_sum = exp_shifted_sum(scores, visible, new_max);
          for (int64_t b = blk0, off = off0, seen = 0; seen < visible; ++b, off = 0) {
            const int64_t n = std::min(g.block_size - off, visible - seen);
            rescale_accumulate(acc + r * D, seen == 0 ? alpha : 1.f, scores + seen,
                               block_ptr(value_cache, b, kvh) + off * token_stride, token_stride, n, D);
            seen += n;
          }
          l[r] = l[r] * alpha + chunk_sum;
          m[r] = new_max;
        }
      }
    }
  }

  for (int64_t t = 0; t < item.num_tokens; ++t) {
    T* dst = out + (item.first_token + t) * g.out_token_stride + head0 * D;
    for (int64_t hr = 0; hr < heads; ++hr) {
      const int64_t r = t * heads + hr;
      const float inv = 1.f / l[r];
      for (int64_t d = 0; d < D; ++d) dst[hr * D + d] = from_float<T>(acc[r * D + d] * inv);
    }
  }
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale, int64_t max_seq_len,
                           std::optional<int64_t> sliding_window, std::optional<double> logits_soft_cap) {
  check_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, max_seq_len,
                        sliding_window, logits_soft_cap);
  check_cache_dtype_pair(query, "query", key_cache, /*allow_mixed=*/true);
  const int64_t num_tokens = query.size(0), num_seqs = seq_lens.size(0);
  Geometry g;
  g.num_heads = query.size(1);
  g.num_kv_heads = key_cache.size(2);
  g.group = g.num_heads / g.num_kv_heads;
  g.head_dim = query.size(2);
  g.block_size = key_cache.size(1);
  g.num_blocks = key_cache.size(0);
  g.max_blocks = block_tables.size(1);
  g.q_token_stride = query.stride(0);
  g.out_token_stride = g.num_heads * g.head_dim;
  g.scale = static_cast<float>(scale);
  g.window = std::max<int64_t>(0, sliding_window.value_or(0));
  g.soft_cap = static_cast<float>(std::max(0.0, logits_soft_cap.value_or(0.0)));

  // Zeros so that padding rows (past the last sequence) come back as 0.
  at::Tensor out = at::zeros({num_tokens, g.num_heads, g.head_dim}, query.options());

  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  TORCH_CHECK(num_seqs == 0 || qsl[0] == 0, "query_start_loc[0] must be 0, got ", qsl[0]);
  const int64_t tile_tokens = std::max<int64_t>(1, kTileRows / g.num_heads);
  std::vector<WorkItem> items;
  std::vector<int64_t> first_pos(num_seqs);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_begin = qsl[s], q_end = qsl[s + 1], q_len = q_end - q_begin;
    TORCH_CHECK(q_len >= 0 && q_end <= num_tokens, "query_start_loc must be non-decreasing and end at most at num_tokens=",
                num_tokens, "; entries ", s, ", ", s + 1, " are ", q_begin, ", ", q_end);
    TORCH_CHECK(lens[s] >= q_len && lens[s] <= g.max_blocks * g.block_size, "seq_lens[", s, "] = ", lens[s],
                " must be between its ", q_len, " new tokens and the block table's capacity ",
                g.max_blocks * g.block_size);
    first_pos[s] = lens[s] - q_len;
    for (int64_t t = q_begin; t < q_end; t += tile_tokens) {
      items.push_back({s, t, std::min(tile_tokens, q_end - t)});
    }
  }

  // A unit of work is a tile over all KV heads, unless there are too few
  // tiles to keep every thread busy (a lone long decode): then KV heads are
  // split across units too.
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t want_units = 4 * at::get_num_threads();
  const int64_t splits = num_items >= want_units ? 1
                         : std::min(g.num_kv_heads, (want_units + num_items - 1) / std::max<int64_t>(num_items, 1));
  const int64_t heads_per_split = (g.num_kv_heads + splits - 1) / splits;
  const int64_t num_work = num_items * splits;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  // Runs the work units with query/output dtype T and cache dtype C.
  auto run = [&](auto* q, const auto* kc, const auto* vc) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(q)>>;
    using C = std::remove_const_t<std::remove_pointer_t<decltype(kc)>>;
    T* o = out.data_ptr<T>();
    // Threads pull units from a shared counter rather than taking fixed
    // halves: work units differ in cost (context lengths), and on a shared
    // machine one thread may be descheduled for a while.
    std::atomic<int64_t> next_unit{0};
    at::parallel_for(0, std::min<int64_t>(num_work, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      std::vector<float> scratch;
      for (int64_t w = next_unit++; w < num_work; w = next_unit++) {
        const WorkItem& item = items[w / splits];
        const int64_t kv_begin = (w % splits) * heads_per_split;
        const int64_t kv_end = std::min(g.num_kv_heads, kv_begin + heads_per_split);
        if (kv_begin >= kv_end) continue;
        const int64_t pos = first_pos[item.seq] + (item.first_token - qsl[item.seq]);
        attend_item<T, C>(item, kv_begin, kv_end, g, q, kc, vc, tables + item.seq * g.max_blocks, pos, o,
                          scratch);
      }
    });
  };
  if (key_cache.scalar_type() == query.scalar_type()) {
    PYSERVE_DISPATCH_FLOAT_TYPES(query.scalar_type(), "paged_attention", [&] {
      run(query.data_ptr<scalar_t>(), key_cache.data_ptr<scalar_t>(), value_cache.data_ptr<scalar_t>());
    });
  } else {
    // check_cache_dtype_pair let only an fp32 query through with another cache dtype.
    PYSERVE_DISPATCH_FLOAT_TYPES(key_cache.scalar_type(), "paged_attention", [&] {
      run(query.data_ptr<float>(), key_cache.data_ptr<scalar_t>(), value_cache.data_ptr<scalar_t>());
    });
  }
  return out;
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY
