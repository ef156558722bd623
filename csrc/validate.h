// Argument checks shared by the CPU and CUDA implementation of each op. Each
// failure is a TORCH_CHECK (a Python RuntimeError) that names the argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace pyserve {

// Head dims the kernels are instantiated for (CUDA templates on them).
bool supported_head_dim(int64_t head_dim);

void check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& slot_mapping);

// The KV cache's dtype against the model-side tensor `t` (query, or key for
// the cache write), named `name` in the message. Equal dtypes always pass;
// with allow_mixed (the CPU kernels), a float32 `t` with a float32, bfloat16
// or float16 cache also does (converted while reading/writing, fp32 math).
void check_cache_dtype_pair(const at::Tensor& t, const char* name, const at::Tensor& key_cache, bool allow_mixed);

void check_compute_slot_mapping(const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                const at::Tensor& query_start_loc, int64_t block_size, int64_t num_tokens);

void check_paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, int64_t max_seq_len,
                           std::optional<int64_t> sliding_window, std::optional<double> logits_soft_cap);

void check_copy_blocks(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_mapping);

void check_sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seeds, const at::Tensor& steps,
                  const at::Tensor& repetition_penalty, const at::Tensor& presence_penalty,
                  const at::Tensor& frequency_penalty, const c10::optional<at::Tensor>& prompt_token_ids,
                  const c10::optional<at::Tensor>& output_token_ids, const c10::optional<at::Tensor>& logit_bias_ids,
                  const c10::optional<at::Tensor>& logit_bias_values, int64_t num_top_logprobs,
                  const c10::optional<at::Tensor>& allowed_token_bitmask);

void check_rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps, double weight_offset);

void check_rms_norm_inplace(const at::Tensor& input, const at::Tensor& weight, double eps, double weight_offset);

void check_fused_add_rms_norm(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& weight,
                              double eps, double weight_offset);

void check_silu_and_mul(const at::Tensor& input);

void check_gelu_tanh_and_mul(const at::Tensor& input);

void check_rotary_embedding(const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& cos, const at::Tensor& sin);

}  // namespace pyserve
