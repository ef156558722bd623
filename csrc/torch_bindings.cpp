// Every op schema of the pyserve namespace, in one place. Implementations are
// registered per device in csrc/cpu/registration.cpp and
// csrc/cuda/registration.cpp; fake (meta) kernels live in pyserve/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(pyserve, m) {
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
  m.def(
      "compute_slot_mapping(Tensor block_tables, Tensor seq_lens, "
      "Tensor query_start_loc, int block_size, int num_tokens) -> (Tensor, Tensor)");
  m.def(
      "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, "
      "float scale, int max_seq_len, int? sliding_window=None, float? logits_soft_cap=None) -> Tensor");
  m.def("copy_blocks(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor block_mapping) -> ()");
  m.def(
      "sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor min_p, Tensor seeds, Tensor steps, Tensor repetition_penalty, "
      "Tensor presence_penalty, Tensor frequency_penalty, Tensor? prompt_token_ids, "
      "Tensor? output_token_ids, Tensor? logit_bias_ids, Tensor? logit_bias_values, "
      "int num_top_logprobs, Tensor? allowed_token_bitmask=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor input, Tensor weight, float eps, float weight_offset=0.0) -> Tensor");
  m.def("rms_norm_inplace(Tensor(a!) input, Tensor weight, float eps, float weight_offset=0.0) -> ()");
  m.def(
      "fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps, "
      "float weight_offset=0.0) -> ()");
  m.def("silu_and_mul(Tensor input) -> Tensor");
  m.def("gelu_tanh_and_mul(Tensor input) -> Tensor");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos, Tensor sin) -> ()");
  // Quantized weights (csrc/quant_ops.h): CPU only.
  m.def("quant_pack(Tensor blocks, int ggml_type, int in_features) -> Tensor");
  m.def(
      "quant_linear(Tensor x, Tensor packed, int ggml_type, int out_features, int in_features, "
      "Tensor? bias=None) -> Tensor");
  m.def(
      "quant_linear_out(Tensor x, Tensor packed, int ggml_type, int out_features, int in_features, "
      "Tensor? bias, Tensor(a!) out) -> ()");
  m.def("quant_dequant_rows(Tensor packed, Tensor ids, int ggml_type, int out_features, int in_features) -> Tensor");
  m.def("quantize_rows(Tensor w, int ggml_type) -> Tensor");
}
