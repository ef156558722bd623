// CPU paged attention for a mixed batch of prefill chunks and decodes.
//
// Work item = (sequence, tile of query tokens with up to kTileRows rows of
// token x head). All heads and tokens of the tile are processed together, so
// each cached K/V block is read once per tile, front to back, instead of once
// per query head and token. Keys are consumed a cache block at a time with an
// online softmax (flash-attention style): scores for the block, one rescale of
// the accumulators, then the weighted V rows. Math is fp32 whatever the
// storage dtype.
#include "dispatch.h"
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "cpu/vec.h"
#include "ops.h"
#include "validate.h"

namespace pyserve::cpu {
namespace {

// Rows (query token x query head) handled by one work item.
constexpr int64_t kTileRows = 64;
// How many blocks ahead to prefetch (measured: 1 block is too short a lead).
constexpr int64_t kPrefetchBlocks = 1;

struct WorkItem {
  int64_t seq;
  int64_t first_token;  // flat row index into query
  int64_t num_tokens;
};

struct Geometry {
  int64_t num_heads, num_kv_heads, group, head_dim, block_size, max_blocks, num_blocks;
  int64_t q_token_stride, out_token_stride;
  float scale;
};

template <typename T>
void attend_item(const WorkItem& item, int64_t kv_begin, int64_t kv_end, const Geometry& g, const T* query,
                 const T* key_cache, const T* value_cache, const int32_t* block_table, int64_t first_pos, T* out,
                 std::vector<float>& scratch) {
  const int64_t D = g.head_dim;
  const int64_t heads = (kv_end - kv_begin) * g.group;  // query heads of this unit
  const int64_t head0 = kv_begin * g.group;
  const int64_t rows = item.num_tokens * heads;  // row r = t * heads + (h - head0)
  // scratch: q [rows, D] | acc [rows, D] | m [rows] | l [rows] | scores [block_size]
  scratch.resize(2 * rows * D + 2 * rows + g.block_size);
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

  // The tile's last token sees the most keys; each row stops at its own position.
  const int64_t kv_len = first_pos + item.num_tokens;
  const int64_t token_stride = g.num_kv_heads * D;  // between consecutive slots of a block
  for (int64_t b = 0; b * g.block_size < kv_len; ++b) {
    const int64_t block = block_table[b];
    TORCH_CHECK(block >= 0 && block < g.num_blocks, "block_tables[", item.seq, "][", b, "] = ", block,
                " is not a block id in [0, ", g.num_blocks, ")");
    // Blocks are scattered in memory, which defeats the hardware prefetcher at
    // every block boundary: ask for the next block while this one is computed.
    if ((b + kPrefetchBlocks) * g.block_size < kv_len) {
      const int64_t ahead = block_table[b + kPrefetchBlocks];
      if (ahead >= 0 && ahead < g.num_blocks) {
        prefetch_bytes(key_cache + ahead * g.block_size * token_stride, g.block_size * token_stride * sizeof(T));
        prefetch_bytes(value_cache + ahead * g.block_size * token_stride, g.block_size * token_stride * sizeof(T));
      }
    }
    // Walking the KV heads inside the block keeps the reads of one block contiguous.
    for (int64_t kvh = kv_begin; kvh < kv_end; ++kvh) {
      const T* k_block = key_cache + block * g.block_size * token_stride + kvh * D;
      const T* v_block = value_cache + block * g.block_size * token_stride + kvh * D;
      for (int64_t t = 0; t < item.num_tokens; ++t) {
        // Causal: the row at position p sees keys 0..p.
        const int64_t visible = std::min(g.block_size, first_pos + t + 1 - b * g.block_size);
        if (visible <= 0) continue;
        for (int64_t h = kvh * g.group; h < (kvh + 1) * g.group; ++h) {
          const int64_t r = t * heads + (h - head0);
          dot_rows(q + r * D, k_block, token_stride, visible, D, scores);
          float block_max = -std::numeric_limits<float>::infinity();
          for (int64_t i = 0; i < visible; ++i) block_max = std::max(block_max, scores[i]);
          const float new_max = std::max(m[r], block_max);
          const float alpha = std::exp(m[r] - new_max);  // 0 on the first block (m = -inf)
          for (int64_t i = 0; i < visible; ++i) scores[i] -= new_max;
          exp_inplace(scores, visible);
          float block_sum = 0.f;
          for (int64_t i = 0; i < visible; ++i) block_sum += scores[i];
          rescale_accumulate(acc + r * D, alpha, scores, v_block, token_stride, visible, D);
          l[r] = l[r] * alpha + block_sum;
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
                           const at::Tensor& query_start_loc, double scale, int64_t max_seq_len) {
  check_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, max_seq_len);
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
  PYSERVE_DISPATCH_FLOAT_TYPES(query.scalar_type(), "paged_attention", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* kc = key_cache.data_ptr<scalar_t>();
    const scalar_t* vc = value_cache.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int32_t* tables = block_tables.data_ptr<int32_t>();
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
        attend_item<scalar_t>(item, kv_begin, kv_end, g, q, kc, vc, tables + item.seq * g.max_blocks, pos, o,
                              scratch);
      }
    });
  });
  return out;
}

}  // namespace pyserve::cpu
