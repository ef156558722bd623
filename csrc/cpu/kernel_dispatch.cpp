// pyserve::cpu's entry points for the ops whose kernels are compiled once per
// ISA variant (attention.cpp, sampling.cpp, layer_kernels.cpp): each calls the
// active variant's (cpu/cpu_features.h). Compiled once, for the baseline ISA;
// registration.cpp registers these functions with torch.
#include "cpu/cpu_dispatch.h"
#include "ops.h"

namespace pyserve::cpu {

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale, int64_t max_seq_len,
                           std::optional<int64_t> sliding_window, std::optional<double> logits_soft_cap) {
  return PYSERVE_CPU_DISPATCH(paged_attention, query, key_cache, value_cache, block_tables, seq_lens,
                              query_start_loc, scale, max_seq_len, sliding_window, logits_soft_cap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& seeds, const at::Tensor& steps, const at::Tensor& repetition_penalty,
    const at::Tensor& presence_penalty, const at::Tensor& frequency_penalty,
    const c10::optional<at::Tensor>& prompt_token_ids, const c10::optional<at::Tensor>& output_token_ids,
    const c10::optional<at::Tensor>& logit_bias_ids, const c10::optional<at::Tensor>& logit_bias_values,
    int64_t num_top_logprobs, const c10::optional<at::Tensor>& allowed_token_bitmask) {
  return PYSERVE_CPU_DISPATCH(sample, logits, temperature, top_k, top_p, min_p, seeds, steps, repetition_penalty,
                              presence_penalty, frequency_penalty, prompt_token_ids, output_token_ids,
                              logit_bias_ids, logit_bias_values, num_top_logprobs, allowed_token_bitmask);
}

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps, double weight_offset) {
  return PYSERVE_CPU_DISPATCH(rms_norm, input, weight, eps, weight_offset);
}

void rms_norm_inplace(at::Tensor& input, const at::Tensor& weight, double eps, double weight_offset) {
  PYSERVE_CPU_DISPATCH(rms_norm_inplace, input, weight, eps, weight_offset);
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps,
                        double weight_offset) {
  PYSERVE_CPU_DISPATCH(fused_add_rms_norm, input, residual, weight, eps, weight_offset);
}

at::Tensor silu_and_mul(const at::Tensor& input) { return PYSERVE_CPU_DISPATCH(silu_and_mul, input); }

at::Tensor gelu_tanh_and_mul(const at::Tensor& input) { return PYSERVE_CPU_DISPATCH(gelu_tanh_and_mul, input); }

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos,
                      const at::Tensor& sin) {
  PYSERVE_CPU_DISPATCH(rotary_embedding, positions, query, key, cos, sin);
}

}  // namespace pyserve::cpu
