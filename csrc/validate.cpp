#include "validate.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace pyserve {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device(),
              "; all arguments must be on one device");
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Rows may be strided (views into a fused QKV projection), but each row's
// [heads, head_dim] must be dense.
void check_dense_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), name,
              " must have dense [heads, head_dim] rows (stride(2) == 1, stride(1) == head_dim), got strides ",
              t.strides());
}

void check_cache_pair(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  check_dim(key_cache, "key_cache", 4, "[num_blocks, block_size, num_kv_heads, head_dim]");
  check_dim(value_cache, "value_cache", 4, "[num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(is_float_type(key_cache.scalar_type()), "key_cache must be float32, float16 or bfloat16, got ",
              key_cache.scalar_type());
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), "value_cache dtype ", value_cache.scalar_type(),
              " differs from key_cache dtype ", key_cache.scalar_type());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache shape ", value_cache.sizes(),
              " differs from key_cache shape ", key_cache.sizes());
  check_same_device(value_cache, "value_cache", key_cache, "key_cache");
  check_contiguous(key_cache, "key_cache");
  check_contiguous(value_cache, "value_cache");
}

void check_row_vector(const at::Tensor& t, const char* name, int64_t batch, at::ScalarType dtype,
                      const at::Tensor& ref) {
  check_dim(t, name, 1, "[batch]");
  TORCH_CHECK(t.size(0) == batch, name, " must have ", batch, " entries (one per logits row), got ", t.size(0));
  check_dtype(t, name, dtype);
  check_same_device(t, name, ref, "logits");
  check_contiguous(t, name);
}

void check_id_matrix(const c10::optional<at::Tensor>& t, const char* name, int64_t batch, const at::Tensor& ref) {
  if (!t.has_value()) return;
  check_dim(*t, name, 2, "[batch, max_len] (-1 = padding)");
  TORCH_CHECK(t->size(0) == batch, name, " must have ", batch, " rows, got ", t->size(0));
  check_dtype(*t, name, at::kLong);
  check_same_device(*t, name, ref, "logits");
  check_contiguous(*t, name);
}

}  // namespace

bool supported_head_dim(int64_t head_dim) {
  switch (head_dim) {
    case 32: case 64: case 80: case 96: case 112: case 128: case 256:
      return true;
    default:
      return false;
  }
}

void check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_cache_pair(key_cache, value_cache);
  check_dim(key, "key", 3, "[num_tokens, num_kv_heads, head_dim]");
  check_dim(value, "value", 3, "[num_tokens, num_kv_heads, head_dim]");
  TORCH_CHECK(key.sizes() == value.sizes(), "value shape ", value.sizes(), " differs from key shape ", key.sizes());
  TORCH_CHECK(key.size(1) == key_cache.size(2) && key.size(2) == key_cache.size(3), "key has [num_kv_heads, head_dim] = [",
              key.size(1), ", ", key.size(2), "] but key_cache has [", key_cache.size(2), ", ", key_cache.size(3), "]");
  // key and value share the model's dtype; the cache may have another (a
  // device's kernel checks which pairs it converts: check_cache_dtype_pair).
  TORCH_CHECK(is_float_type(key.scalar_type()), "key must be float32, float16 or bfloat16, got ", key.scalar_type());
  TORCH_CHECK(value.scalar_type() == key.scalar_type(), "value dtype ", value.scalar_type(), " differs from key dtype ",
              key.scalar_type());
  check_dense_rows(key, "key");
  check_dense_rows(value, "value");
  check_dim(slot_mapping, "slot_mapping", 1, "[num_tokens]");
  check_dtype(slot_mapping, "slot_mapping", at::kLong);
  check_contiguous(slot_mapping, "slot_mapping");
  TORCH_CHECK(slot_mapping.size(0) == key.size(0), "slot_mapping has ", slot_mapping.size(0), " entries but key has ",
              key.size(0), " tokens");
  check_same_device(key, "key", key_cache, "key_cache");
  check_same_device(value, "value", key_cache, "key_cache");
  check_same_device(slot_mapping, "slot_mapping", key_cache, "key_cache");
}

void check_cache_dtype_pair(const at::Tensor& t, const char* name, const at::Tensor& key_cache,
                            bool allow_mixed) {
  const at::ScalarType a = t.scalar_type(), c = key_cache.scalar_type();
  if (a == c) return;
  TORCH_CHECK(allow_mixed, "key_cache dtype ", c, " differs from ", name, " dtype ", a,
              "; on ", key_cache.device().type(), " the KV cache must have the model's dtype");
  TORCH_CHECK(a == at::kFloat, "key_cache dtype ", c, " differs from ", name, " dtype ", a,
              "; a cache of another dtype than ", name, "'s needs ", name, " in float32 (supported: ", name,
              " float32 with a float32, bfloat16 or float16 cache, or cache dtype == ", name, " dtype)");
}

static void check_batch_layout(const at::Tensor& block_tables, const at::Tensor& seq_lens,
                               const at::Tensor& query_start_loc, const at::Tensor& ref, const char* ref_name) {
  check_dim(block_tables, "block_tables", 2, "[num_seqs, max_blocks_per_seq]");
  check_dtype(block_tables, "block_tables", at::kInt);
  check_contiguous(block_tables, "block_tables");
  check_dim(seq_lens, "seq_lens", 1, "[num_seqs]");
  check_dtype(seq_lens, "seq_lens", at::kInt);
  check_contiguous(seq_lens, "seq_lens");
  check_dim(query_start_loc, "query_start_loc", 1, "[num_seqs + 1]");
  check_dtype(query_start_loc, "query_start_loc", at::kInt);
  check_contiguous(query_start_loc, "query_start_loc");
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(block_tables.size(0) == num_seqs, "block_tables has ", block_tables.size(0), " rows but seq_lens has ",
              num_seqs, " sequences");
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1, "query_start_loc must have num_seqs + 1 = ", num_seqs + 1,
              " entries, got ", query_start_loc.size(0));
  check_same_device(block_tables, "block_tables", ref, ref_name);
  check_same_device(seq_lens, "seq_lens", ref, ref_name);
  check_same_device(query_start_loc, "query_start_loc", ref, ref_name);
}

void check_compute_slot_mapping(const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                const at::Tensor& query_start_loc, int64_t block_size, int64_t num_tokens) {
  check_batch_layout(block_tables, seq_lens, query_start_loc, block_tables, "block_tables");
  TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  TORCH_CHECK(num_tokens >= 0, "num_tokens must be >= 0, got ", num_tokens);
}

void check_paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, int64_t max_seq_len,
                           std::optional<int64_t> sliding_window, std::optional<double> logits_soft_cap) {
  check_cache_pair(key_cache, value_cache);
  check_dim(query, "query", 3, "[num_tokens, num_heads, head_dim]");
  TORCH_CHECK(is_float_type(query.scalar_type()), "query must be float32, float16 or bfloat16, got ",
              query.scalar_type());
  check_dense_rows(query, "query");
  check_same_device(query, "query", key_cache, "key_cache");
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(key_cache.size(3) == head_dim, "query head_dim ", head_dim, " differs from key_cache head_dim ",
              key_cache.size(3));
  TORCH_CHECK(supported_head_dim(head_dim), "head_dim ", head_dim,
              " is not supported (supported: 32, 64, 80, 96, 112, 128, 256)");
  const int64_t num_heads = query.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "query has ", num_heads,
              " heads, which is not a multiple of key_cache's ", num_kv_heads, " KV heads");
  check_batch_layout(block_tables, seq_lens, query_start_loc, query, "query");
  TORCH_CHECK(max_seq_len >= 0, "max_seq_len must be >= 0, got ", max_seq_len);
  // Every integer is a valid sliding_window (<= 0 = off), so there is nothing to check there.
  (void)sliding_window;
  if (logits_soft_cap.has_value()) {
    const double cap = *logits_soft_cap;
    TORCH_CHECK(std::isfinite(cap), "logits_soft_cap must be finite (<= 0 or None = off), got ", cap);
    // The kernels compute in fp32 with s * (1 / cap): both must be finite.
    TORCH_CHECK(cap <= 0 || (std::isfinite(static_cast<float>(cap)) && static_cast<float>(cap) > 0.f &&
                             std::isfinite(1.f / static_cast<float>(cap))),
                "logits_soft_cap must be between 1e-38 and 3e38 in float32 when positive, got ", cap);
  }
}

void check_copy_blocks(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_mapping) {
  check_cache_pair(key_cache, value_cache);
  check_dim(block_mapping, "block_mapping", 2, "[num_pairs, 2]");
  TORCH_CHECK(block_mapping.size(1) == 2, "block_mapping must be [num_pairs, 2] (src, dst), got shape ",
              block_mapping.sizes());
  check_dtype(block_mapping, "block_mapping", at::kLong);
  check_contiguous(block_mapping, "block_mapping");
  check_same_device(block_mapping, "block_mapping", key_cache, "key_cache");
}

void check_sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seeds, const at::Tensor& steps,
                  const at::Tensor& repetition_penalty, const at::Tensor& presence_penalty,
                  const at::Tensor& frequency_penalty, const c10::optional<at::Tensor>& prompt_token_ids,
                  const c10::optional<at::Tensor>& output_token_ids, const c10::optional<at::Tensor>& logit_bias_ids,
                  const c10::optional<at::Tensor>& logit_bias_values, int64_t num_top_logprobs,
                  const c10::optional<at::Tensor>& allowed_token_bitmask) {
  check_dim(logits, "logits", 2, "[batch, vocab]");
  TORCH_CHECK(is_float_type(logits.scalar_type()), "logits must be float32, float16 or bfloat16, got ",
              logits.scalar_type());
  check_contiguous(logits, "logits");
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "logits must have a non-empty vocab dimension");
  check_row_vector(temperature, "temperature", batch, at::kFloat, logits);
  check_row_vector(top_k, "top_k", batch, at::kInt, logits);
  check_row_vector(top_p, "top_p", batch, at::kFloat, logits);
  check_row_vector(min_p, "min_p", batch, at::kFloat, logits);
  check_row_vector(seeds, "seeds", batch, at::kLong, logits);
  check_row_vector(steps, "steps", batch, at::kLong, logits);
  check_row_vector(repetition_penalty, "repetition_penalty", batch, at::kFloat, logits);
  check_row_vector(presence_penalty, "presence_penalty", batch, at::kFloat, logits);
  check_row_vector(frequency_penalty, "frequency_penalty", batch, at::kFloat, logits);
  check_id_matrix(prompt_token_ids, "prompt_token_ids", batch, logits);
  check_id_matrix(output_token_ids, "output_token_ids", batch, logits);
  check_id_matrix(logit_bias_ids, "logit_bias_ids", batch, logits);
  TORCH_CHECK(logit_bias_ids.has_value() == logit_bias_values.has_value(),
              "logit_bias_ids and logit_bias_values must be given together");
  if (logit_bias_values.has_value()) {
    check_dim(*logit_bias_values, "logit_bias_values", 2, "[batch, max_bias]");
    TORCH_CHECK(logit_bias_values->sizes() == logit_bias_ids->sizes(), "logit_bias_values shape ",
                logit_bias_values->sizes(), " differs from logit_bias_ids shape ", logit_bias_ids->sizes());
    check_dtype(*logit_bias_values, "logit_bias_values", at::kFloat);
    check_same_device(*logit_bias_values, "logit_bias_values", logits, "logits");
    check_contiguous(*logit_bias_values, "logit_bias_values");
  }
  TORCH_CHECK(num_top_logprobs >= 0 && num_top_logprobs <= vocab, "num_top_logprobs must be in [0, vocab=", vocab,
              "], got ", num_top_logprobs);
  if (allowed_token_bitmask.has_value()) {
    // Any width: ids >= 32 * num_words are not allowed, bits of ids >= vocab are ignored.
    const at::Tensor& mask = *allowed_token_bitmask;
    check_dim(mask, "allowed_token_bitmask", 2, "[batch, num_words]");
    TORCH_CHECK(mask.size(0) == batch, "allowed_token_bitmask must have ", batch,
                " rows (one per logits row), got ", mask.size(0));
    check_dtype(mask, "allowed_token_bitmask", at::kInt);
    check_same_device(mask, "allowed_token_bitmask", logits, "logits");
    check_contiguous(mask, "allowed_token_bitmask");
  }
}

static void check_norm_weight(const at::Tensor& weight, const at::Tensor& input, const char* input_name, double eps,
                              double weight_offset) {
  check_dim(weight, "weight", 1, "[hidden]");
  TORCH_CHECK(weight.size(0) == input.size(-1), "weight has ", weight.size(0), " entries but ", input_name,
              " rows have ", input.size(-1));
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "weight dtype ", weight.scalar_type(), " differs from ",
              input_name, " dtype ", input.scalar_type());
  check_contiguous(weight, "weight");
  check_same_device(weight, "weight", input, input_name);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(weight_offset), "weight_offset must be finite (0: Llama's weight, 1: Gemma's 1 + weight), got ",
              weight_offset);
}

static void check_float_rows(const at::Tensor& t, const char* name, const char* shape) {
  check_dim(t, name, 2, shape);
  TORCH_CHECK(is_float_type(t.scalar_type()), name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, name, " must have dense rows (stride(1) == 1), got strides ",
              t.strides());
}

void check_rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps, double weight_offset) {
  check_float_rows(input, "input", "[num_tokens, hidden]");
  check_norm_weight(weight, input, "input", eps, weight_offset);
}

void check_rms_norm_inplace(const at::Tensor& input, const at::Tensor& weight, double eps, double weight_offset) {
  TORCH_CHECK(input.dim() == 2 || input.dim() == 3,
              "input must be 2-D [num_tokens, hidden] or 3-D [num_tokens, num_heads, head_dim], got shape ",
              input.sizes());
  TORCH_CHECK(is_float_type(input.scalar_type()), "input must be float32, float16 or bfloat16, got ",
              input.scalar_type());
  TORCH_CHECK(input.stride(-1) == 1 || input.size(-1) <= 1,
              "input must have a contiguous last dimension (stride(-1) == 1), got strides ", input.strides());
  // Written in place, so no two rows may share memory: taken by increasing
  // stride, each leading dimension must step past everything the ones
  // before it span (holds for any slice of a dense tensor, e.g. the q or k
  // heads of a fused QKV projection).
  std::vector<std::pair<int64_t, int64_t>> outer;  // (stride, size) of the leading dims with size > 1
  for (int64_t d = 0; d + 1 < input.dim(); ++d) {
    if (input.size(d) > 1) outer.emplace_back(input.stride(d), input.size(d));
  }
  std::sort(outer.begin(), outer.end());
  int64_t extent = input.size(-1);
  for (const auto& [stride, size] : outer) {
    TORCH_CHECK(stride >= extent, "input rows overlap in memory (sizes ", input.sizes(), ", strides ",
                input.strides(), "); rms_norm_inplace writes every row in place");
    extent = stride * (size - 1) + extent;
  }
  check_norm_weight(weight, input, "input", eps, weight_offset);
}

void check_fused_add_rms_norm(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& weight,
                              double eps, double weight_offset) {
  check_float_rows(input, "input", "[num_tokens, hidden]");
  check_contiguous(input, "input");
  check_dim(residual, "residual", 2, "[num_tokens, hidden]");
  TORCH_CHECK(residual.sizes() == input.sizes(), "residual shape ", residual.sizes(), " differs from input shape ",
              input.sizes());
  TORCH_CHECK(residual.scalar_type() == input.scalar_type(), "residual dtype ", residual.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  check_contiguous(residual, "residual");
  check_same_device(residual, "residual", input, "input");
  check_norm_weight(weight, input, "input", eps, weight_offset);
}

void check_silu_and_mul(const at::Tensor& input) {
  check_float_rows(input, "input", "[num_tokens, 2 * d]");
  TORCH_CHECK(input.size(1) % 2 == 0, "input's last dimension must be even ([gate | up]), got ", input.size(1));
}

void check_gelu_tanh_and_mul(const at::Tensor& input) { check_silu_and_mul(input); }

void check_rotary_embedding(const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& cos, const at::Tensor& sin) {
  check_dim(query, "query", 3, "[num_tokens, num_heads, head_dim]");
  check_dim(key, "key", 3, "[num_tokens, num_kv_heads, head_dim]");
  TORCH_CHECK(is_float_type(query.scalar_type()), "query must be float32, float16 or bfloat16, got ",
              query.scalar_type());
  TORCH_CHECK(key.scalar_type() == query.scalar_type(), "key dtype ", key.scalar_type(), " differs from query dtype ",
              query.scalar_type());
  check_dense_rows(query, "query");
  check_dense_rows(key, "key");
  const int64_t num_tokens = query.size(0), head_dim = query.size(2);
  TORCH_CHECK(key.size(0) == num_tokens, "key has ", key.size(0), " tokens but query has ", num_tokens);
  TORCH_CHECK(key.size(2) == head_dim, "key head_dim ", key.size(2), " differs from query head_dim ", head_dim);
  TORCH_CHECK(head_dim % 2 == 0, "head_dim must be even, got ", head_dim);
  check_dim(positions, "positions", 1, "[num_tokens]");
  check_dtype(positions, "positions", at::kLong);
  check_contiguous(positions, "positions");
  TORCH_CHECK(positions.size(0) == num_tokens, "positions has ", positions.size(0), " entries but query has ",
              num_tokens, " tokens");
  auto check_table = [&](const at::Tensor& t, const char* name) {
    check_dim(t, name, 2, "[max_positions, head_dim / 2]");
    TORCH_CHECK(t.size(1) == head_dim / 2, name, " must have head_dim / 2 = ", head_dim / 2, " columns, got ",
                t.size(1));
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, " dtype ", t.scalar_type(),
                " differs from query dtype ", query.scalar_type());
    check_contiguous(t, name);
    check_same_device(t, name, query, "query");
  };
  check_table(cos, "cos");
  check_table(sin, "sin");
  TORCH_CHECK(sin.size(0) == cos.size(0), "sin has ", sin.size(0), " positions but cos has ", cos.size(0));
  check_same_device(key, "key", query, "query");
  check_same_device(positions, "positions", query, "query");
}

}  // namespace pyserve
