#include "ops.h"
#include "validate.h"

namespace pyserve::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& seeds, const at::Tensor& steps, const at::Tensor& repetition_penalty,
    const at::Tensor& presence_penalty, const at::Tensor& frequency_penalty,
    const c10::optional<at::Tensor>& prompt_token_ids, const c10::optional<at::Tensor>& output_token_ids,
    const c10::optional<at::Tensor>& logit_bias_ids, const c10::optional<at::Tensor>& logit_bias_values,
    int64_t num_top_logprobs) {
  TORCH_CHECK(false, "STUB: sample is being written");
}

}  // namespace pyserve::cpu
