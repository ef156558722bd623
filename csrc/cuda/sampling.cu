// CUDA sampling, exactly as csrc/SAMPLING.md defines it; one thread block per
// logits row.
//
// Per row: (1) raw log-softmax statistics (max, log-sum-exp) while copying the
// logits to an fp32 workspace row; (2) logit bias applied by one thread in list
// order (duplicates add up deterministically); (3) prompt/output ids are
// counted in a per-row int32 workspace (only the listed ids' entries are
// zeroed, so nothing O(vocab) is memset) and each distinct id is penalised
// exactly once by the thread that claims it; (4) greedy = block argmax (lowest
// id on ties); otherwise w = exp(x / T - max) in place, the top-k and top-p
// thresholds are found by binary searches over the float bit pattern (w >= 0,
// so uint32 order is float order), and the draw is a block-wide prefix scan
// (cub::BlockScan, fp64) in increasing id order. Top-N logprobs: binary search
// for the N-th largest log-prob key, strictly-larger entries ranked in shared
// memory, boundary ties taken in id order by a scan. For N > kMaxTopInKernel
// the top-N is a stable descending torch sort of log_softmax instead.
//
// Allowed-token bitmask (SAMPLING.md step 5): the argmax skips disallowed ids
// (none allowed: token -1) and their w is 0, which makes them absent from
// every threshold (a threshold > 0 ignores zeros; one of 0 is 0 either way)
// and from the draw's masses; the kept() test excludes them from M itself so
// the draw's past-the-end and empty-M fallbacks stay on allowed ids.
#include <ATen/ops/empty.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_scan.cuh>

#include <climits>
#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"
#include "dispatch.h"
#include "ops.h"
#include "validate.h"

namespace pyserve::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kNumWarps = kThreads / kWarpSize;
constexpr int kItems = 4;                     // consecutive ids per thread in scans
constexpr int kChunk = kThreads * kItems;
constexpr int kMaxTopInKernel = 1024;

// marks workspace: low bits count occurrences in the output list.
constexpr int kCountMask = (1 << 28) - 1;
constexpr int kPromptBit = 1 << 28;
constexpr int kClaimBit = 1 << 29;

template <typename T>
struct SampleParams {
  const T* logits;
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const float* min_p;
  const int64_t* seeds;
  const int64_t* steps;
  const float* repetition_penalty;
  const float* presence_penalty;
  const float* frequency_penalty;
  const int64_t* prompt;  // [batch, prompt_len] or null
  const int64_t* output;  // [batch, output_len] or null
  const int64_t* bias_ids;
  const float* bias_values;
  const uint32_t* mask;  // [batch, mask_words] int32 words read as uint32, null when there is no mask
  int64_t mask_words;
  bool masked;
  float* ws;      // [batch, vocab]
  int32_t* marks; // [batch, vocab], null when there are no id lists
  int64_t* sampled;
  float* sampled_logprob;
  int64_t* top_ids;
  float* top_logprobs;
  int64_t prompt_len, output_len, bias_len;
  int vocab;
  int num_top;  // handled in the kernel (0 when the host does it)
  int num_top_total;
};

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ double uniform(int64_t seed, int64_t step) {
  const uint64_t h = splitmix64(splitmix64(static_cast<uint64_t>(seed)) + static_cast<uint64_t>(step));
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

// Monotone map of a float onto uint32 (larger float -> larger key).
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a + b; }
};
struct MinIntOp {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};
struct MaxIntOp {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// All threads of the block must call it; every thread gets the result.
template <typename V, typename Op>
__device__ V block_allreduce(V v, Op op, V* smem) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // the previous call's readers are done with smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  V r = smem[0];
#pragma unroll
  for (int w = 1; w < kNumWarps; ++w) r = op(r, smem[w]);
  return r;
}

__device__ __forceinline__ bool argmax_better(float v, int id, float bv, int bid) {
  return v > bv || (v == bv && id < bid);
}

__device__ void block_argmax(float& v, int& id, float* sf, int* si) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, id, o);
    if (argmax_better(ov, oi, v, id)) {
      v = ov;
      id = oi;
    }
  }
  __syncthreads();
  if (lane == 0) {
    sf[warp] = v;
    si[warp] = id;
  }
  __syncthreads();
  v = sf[0];
  id = si[0];
  for (int w = 1; w < kNumWarps; ++w) {
    if (argmax_better(sf[w], si[w], v, id)) {
      v = sf[w];
      id = si[w];
    }
  }
}

__device__ __forceinline__ bool valid_id(int64_t id, int vocab) { return id >= 0 && id < vocab; }

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(const SampleParams<T> p) {
  using ScanInt = cub::BlockScan<int, kThreads>;
  using ScanDouble = cub::BlockScan<double, kThreads>;
  __shared__ union {
    typename ScanInt::TempStorage i;
    typename ScanDouble::TempStorage d;
  } scan_tmp;
  __shared__ float red_f[kNumWarps];
  __shared__ int red_i[kNumWarps];
  __shared__ double red_d[kNumWarps];
  __shared__ int top_count;
  __shared__ uint32_t top_key[kMaxTopInKernel];
  __shared__ int top_id[kMaxTopInKernel];

  const int64_t b = blockIdx.x;
  const int V = p.vocab;
  const int tid = threadIdx.x;
  const T* logits = p.logits + b * V;
  float* x = p.ws + b * V;
  const uint32_t* mask = p.mask ? p.mask + b * p.mask_words : nullptr;
  const bool masked = p.masked;
  // Bit i % 32 of word i / 32; ids past the mask's words are not allowed.
  auto allowed = [&](int i) {
    return !masked || (static_cast<int64_t>(i >> 5) < p.mask_words && ((mask[i >> 5] >> (i & 31)) & 1u));
  };

  // 1. Raw log-softmax statistics; copy the logits to fp32.
  float mx = -INFINITY;
  for (int i = tid; i < V; i += kThreads) {
    const float v = to_float(logits[i]);
    x[i] = v;
    mx = fmaxf(mx, v);
  }
  const float raw_max = block_allreduce(mx, MaxOp{}, red_f);
  float se = 0.f;
  for (int i = tid; i < V; i += kThreads) se += expf(x[i] - raw_max);  // own writes
  const float log_sum = logf(block_allreduce(se, SumOp{}, red_f));
  auto logprob = [&](int i) { return (to_float(logits[i]) - raw_max) - log_sum; };

  // 2. Logit bias (one thread, list order) and zeroing of the listed marks.
  int32_t* marks = p.marks ? p.marks + b * V : nullptr;
  const int64_t* prompt = p.prompt ? p.prompt + b * p.prompt_len : nullptr;
  const int64_t* output = p.output ? p.output + b * p.output_len : nullptr;
  const int64_t n_listed = (prompt ? p.prompt_len : 0) + (output ? p.output_len : 0);
  auto listed = [&](int64_t e) -> int64_t {
    const int64_t np = prompt ? p.prompt_len : 0;
    return e < np ? prompt[e] : output[e - np];
  };
  if (marks) {
    for (int64_t e = tid; e < n_listed; e += kThreads) {
      const int64_t id = listed(e);
      if (valid_id(id, V)) marks[id] = 0;
    }
  }
  if (tid == 0 && p.bias_ids) {
    const int64_t* ids = p.bias_ids + b * p.bias_len;
    const float* vals = p.bias_values + b * p.bias_len;
    for (int64_t j = 0; j < p.bias_len; ++j) {
      if (valid_id(ids[j], V)) x[ids[j]] += vals[j];
    }
  }
  __syncthreads();

  // 3. Penalties, once per distinct listed id.
  const float rep = p.repetition_penalty[b], pres = p.presence_penalty[b], freq = p.frequency_penalty[b];
  if (marks && (rep != 1.f || pres != 0.f || freq != 0.f)) {
    if (prompt) {
      for (int64_t e = tid; e < p.prompt_len; e += kThreads) {
        if (valid_id(prompt[e], V)) atomicOr(&marks[prompt[e]], kPromptBit);
      }
    }
    if (output) {
      for (int64_t e = tid; e < p.output_len; e += kThreads) {
        if (valid_id(output[e], V)) atomicAdd(&marks[output[e]], 1);
      }
    }
    __syncthreads();
    for (int64_t e = tid; e < n_listed; e += kThreads) {
      const int64_t id = listed(e);
      if (!valid_id(id, V)) continue;
      const int old = atomicOr(&marks[id], kClaimBit);
      if (old & kClaimBit) continue;  // another entry of the same id got it
      float v = x[id];
      if (rep != 1.f) v = v > 0.f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep);
      const int count = old & kCountMask;
      if (count > 0 && (freq != 0.f || pres != 0.f)) {
        v = __fsub_rn(v, __fadd_rn(__fmul_rn(freq, static_cast<float>(count)), pres));
      }
      x[id] = v;
    }
  }
  __syncthreads();

  // 4. argmax over the allowed ids (lowest id on ties) = greedy token and max
  // for the softmax; best_id stays INT_MAX when no id is allowed.
  float best = -INFINITY;
  int best_id = INT_MAX;
  for (int i = tid; i < V; i += kThreads) {
    if (!allowed(i)) continue;
    float v = x[i];
    if (isnan(v)) v = -INFINITY;
    if (argmax_better(v, i, best, best_id)) {
      best = v;
      best_id = i;
    }
  }
  block_argmax(best, best_id, red_f, red_i);

  int token = best_id != INT_MAX ? best_id : -1;  // block-uniform
  const float temperature = p.temperature[b];
  if (token >= 0 && !(temperature <= 1e-5f)) {
    // 5. w = exp(x / T - max z), in place; 0 for disallowed ids.
    const float zmax = __fdiv_rn(best, temperature);
    for (int i = tid; i < V; i += kThreads) {
      float w = expf(__fsub_rn(__fdiv_rn(x[i], temperature), zmax));
      if (!(w >= 0.f)) w = 0.f;  // NaN
      x[i] = allowed(i) ? w : 0.f;
    }
    __syncthreads();

    // top-k: the largest threshold t with count(w >= t) >= k.
    const int k = p.top_k[b];
    uint32_t t_k = 0;
    if (k >= 1 && k < V) {
      for (int bit = 30; bit >= 0; --bit) {
        const uint32_t cand = t_k | (1u << bit);
        int cnt = 0;
        for (int i = tid; i < V; i += kThreads) cnt += __float_as_uint(x[i]) >= cand;
        if (block_allreduce(cnt, SumOp{}, red_i) >= k) t_k = cand;
      }
    }
    // top-p: the largest t among the kept w with sum_{w >= t} w >= p * Z_K.
    const float top_p = p.top_p[b];
    uint32_t t_p = 0;
    if (top_p < 1.f) {
      double zk = 0.0;
      float wk_max = 0.f;  // largest w in K (1 unless every w is 0)
      for (int i = tid; i < V; i += kThreads) {
        const float w = x[i];
        if (__float_as_uint(w) >= t_k) {
          zk += w;
          wk_max = fmaxf(wk_max, w);
        }
      }
      const double target = static_cast<double>(top_p) * block_allreduce(zk, SumOp{}, red_d);
      wk_max = block_allreduce(wk_max, MaxOp{}, red_f);
      const uint32_t lo = t_k;
      for (int bit = 30; bit >= 0; --bit) {
        const uint32_t cand = t_p | (1u << bit);
        const uint32_t thr = cand > lo ? cand : lo;
        double s = 0.0;
        for (int i = tid; i < V; i += kThreads) {
          const float w = x[i];
          if (__float_as_uint(w) >= thr) s += w;
        }
        if (block_allreduce(s, SumOp{}, red_d) >= target) t_p = cand;
      }
      // t_p must be one of K's values (SAMPLING.md 7). The search lands on one
      // whenever target > 0, but if target == 0 (every w is 0, e.g. a row of
      // -inf logits) every candidate passes and t_p would end above all w,
      // emptying P; the spec's t_p is then the largest w (0), keeping all.
      if (t_p > __float_as_uint(wk_max)) t_p = __float_as_uint(wk_max);
    }
    const uint32_t thr = t_k > t_p ? t_k : t_p;
    const float min_p = p.min_p[b];
    const bool use_min_p = min_p > 0.f;
    auto kept = [&](int i, float w) {
      return __float_as_uint(w) >= thr && (!use_min_p || w >= min_p) && allowed(i);
    };

    // Draw: first kept id (increasing id order) whose running sum passes u * Z.
    double z = 0.0;
    for (int i = tid; i < V; i += kThreads) {
      const float w = x[i];
      if (kept(i, w)) z += w;
    }
    z = block_allreduce(z, SumOp{}, red_d);
    const double target = uniform(p.seeds[b], p.steps[b]) * z;
    double carry = 0.0;
    int found = INT_MAX, last = -1;
    for (int base = 0; base < V; base += kChunk) {
      const int first = base + tid * kItems;
      float w[kItems];
      double local = 0.0;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        w[j] = first + j < V ? x[first + j] : 0.f;
        if (first + j < V && kept(first + j, w[j])) local += w[j];
      }
      double prefix, aggregate;
      ScanDouble(scan_tmp.d).ExclusiveSum(local, prefix, aggregate);
      double c = carry + prefix;
      int my_found = INT_MAX, my_last = -1;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        if (first + j < V && kept(first + j, w[j])) {
          if (my_found == INT_MAX && c + w[j] > target) my_found = first + j;
          c += w[j];
          my_last = first + j;
        }
      }
      const int chunk_found = block_allreduce(my_found, MinIntOp{}, red_i);
      const int chunk_last = block_allreduce(my_last, MaxIntOp{}, red_i);
      if (chunk_last > last) last = chunk_last;
      carry += aggregate;
      if (chunk_found != INT_MAX) {
        found = chunk_found;
        break;  // block-uniform
      }
    }
    // M is empty when every allowed w is 0 (a row of -inf logits) and
    // min_p > 0, or min_p > 1: the last allowed id (V - 1 without a mask).
    if (found != INT_MAX) {
      token = found;
    } else if (last >= 0) {
      token = last;
    } else {
      int my_last = -1;
      for (int i = tid; i < V; i += kThreads) {
        if (allowed(i)) my_last = i;  // increasing in i
      }
      token = block_allreduce(my_last, MaxIntOp{}, red_i);  // >= 0: some id is allowed
    }
  }
  if (tid == 0) {
    p.sampled[b] = token;
    p.sampled_logprob[b] = token >= 0 ? logprob(token) : -INFINITY;
  }

  // 6. Top-N raw log-probs, descending, ties by lower id.
  const int n_top = p.num_top;
  if (n_top <= 0) return;  // block-uniform
  int64_t* out_ids = p.top_ids + b * p.num_top_total;
  float* out_lp = p.top_logprobs + b * p.num_top_total;
  uint32_t t = 0;  // the largest key with count(key >= t) >= n_top
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = t | (1u << bit);
    int cnt = 0;
    for (int i = tid; i < V; i += kThreads) cnt += order_key(logprob(i)) >= cand;
    if (block_allreduce(cnt, SumOp{}, red_i) >= n_top) t = cand;
  }
  if (tid == 0) top_count = 0;
  __syncthreads();
  for (int i = tid; i < V; i += kThreads) {
    const uint32_t key = order_key(logprob(i));
    if (key > t) {  // fewer than n_top <= kMaxTopInKernel of these
      const int slot = atomicAdd(&top_count, 1);
      top_key[slot] = key;
      top_id[slot] = i;
    }
  }
  __syncthreads();
  const int n_gt = top_count;
  const int need = n_top - n_gt;  // boundary ties, taken in id order
  int tie_base = 0;
  for (int base = 0; base < V && tie_base < need; base += kChunk) {
    const int first = base + tid * kItems;
    bool tie[kItems];
    int local = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      tie[j] = first + j < V && order_key(logprob(first + j)) == t;
      local += tie[j];
    }
    int prefix, aggregate;
    ScanInt(scan_tmp.i).ExclusiveSum(local, prefix, aggregate);
    int r = tie_base + prefix;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (tie[j]) {
        if (r < need) {
          out_ids[n_gt + r] = first + j;
          out_lp[n_gt + r] = logprob(first + j);
        }
        ++r;
      }
    }
    tie_base += aggregate;
    __syncthreads();  // scan_tmp is reused
  }
  for (int e = tid; e < n_gt; e += kThreads) {
    const uint32_t key = top_key[e];
    const int id = top_id[e];
    int rank = 0;
    for (int f = 0; f < n_gt; ++f) rank += top_key[f] > key || (top_key[f] == key && top_id[f] < id);
    out_ids[rank] = id;
    out_lp[rank] = logprob(id);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& seeds, const at::Tensor& steps, const at::Tensor& repetition_penalty,
    const at::Tensor& presence_penalty, const at::Tensor& frequency_penalty,
    const c10::optional<at::Tensor>& prompt_token_ids, const c10::optional<at::Tensor>& output_token_ids,
    const c10::optional<at::Tensor>& logit_bias_ids, const c10::optional<at::Tensor>& logit_bias_values,
    int64_t num_top_logprobs, const c10::optional<at::Tensor>& allowed_token_bitmask) {
  check_sample(logits, temperature, top_k, top_p, min_p, seeds, steps, repetition_penalty, presence_penalty,
               frequency_penalty, prompt_token_ids, output_token_ids, logit_bias_ids, logit_bias_values,
               num_top_logprobs, allowed_token_bitmask);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const auto long_opts = logits.options().dtype(at::kLong);
  const auto float_opts = logits.options().dtype(at::kFloat);
  at::Tensor sampled = at::empty({batch}, long_opts);
  at::Tensor sampled_logprob = at::empty({batch}, float_opts);
  at::Tensor top_ids = at::empty({batch, num_top_logprobs}, long_opts);
  at::Tensor top_logprobs = at::empty({batch, num_top_logprobs}, float_opts);
  if (batch == 0) return {sampled, sampled_logprob, top_ids, top_logprobs};
  // int ids in the kernel; the strided loops step up to kChunk past the last
  // id (i += kThreads, base += kChunk), which must not overflow int.
  TORCH_CHECK(vocab <= INT_MAX - kChunk, "sample supports vocab sizes below 2^31 - ", kChunk, ", got ", vocab);
  TORCH_CHECK(batch <= INT_MAX, "sample supports at most 2^31 - 1 rows, got ", batch);
  const c10::cuda::CUDAGuard guard(logits.device());

  auto present = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->numel() > 0; };
  const bool has_prompt = present(prompt_token_ids), has_output = present(output_token_ids);
  const bool has_bias = present(logit_bias_ids);
  at::Tensor ws = at::empty({batch, vocab}, float_opts);
  at::Tensor marks;
  if (has_prompt || has_output) marks = at::empty({batch, vocab}, logits.options().dtype(at::kInt));
  const bool top_in_kernel = num_top_logprobs <= kMaxTopInKernel;

  PYSERVE_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "sample", [&] {
    SampleParams<scalar_t> p;
    p.logits = logits.data_ptr<scalar_t>();
    p.temperature = temperature.data_ptr<float>();
    p.top_k = top_k.data_ptr<int32_t>();
    p.top_p = top_p.data_ptr<float>();
    p.min_p = min_p.data_ptr<float>();
    p.seeds = seeds.data_ptr<int64_t>();
    p.steps = steps.data_ptr<int64_t>();
    p.repetition_penalty = repetition_penalty.data_ptr<float>();
    p.presence_penalty = presence_penalty.data_ptr<float>();
    p.frequency_penalty = frequency_penalty.data_ptr<float>();
    p.prompt = has_prompt ? prompt_token_ids->data_ptr<int64_t>() : nullptr;
    p.prompt_len = has_prompt ? prompt_token_ids->size(1) : 0;
    p.output = has_output ? output_token_ids->data_ptr<int64_t>() : nullptr;
    p.output_len = has_output ? output_token_ids->size(1) : 0;
    p.bias_ids = has_bias ? logit_bias_ids->data_ptr<int64_t>() : nullptr;
    p.bias_values = has_bias ? logit_bias_values->data_ptr<float>() : nullptr;
    p.bias_len = has_bias ? logit_bias_ids->size(1) : 0;
    p.masked = allowed_token_bitmask.has_value();
    p.mask_words = p.masked ? allowed_token_bitmask->size(1) : 0;
    p.mask = p.mask_words > 0 ? reinterpret_cast<const uint32_t*>(allowed_token_bitmask->data_ptr<int32_t>())
                              : nullptr;
    p.ws = ws.data_ptr<float>();
    p.marks = marks.defined() ? marks.data_ptr<int32_t>() : nullptr;
    p.sampled = sampled.data_ptr<int64_t>();
    p.sampled_logprob = sampled_logprob.data_ptr<float>();
    p.top_ids = top_ids.data_ptr<int64_t>();
    p.top_logprobs = top_logprobs.data_ptr<float>();
    p.vocab = static_cast<int>(vocab);
    p.num_top = top_in_kernel ? static_cast<int>(num_top_logprobs) : 0;
    p.num_top_total = static_cast<int>(num_top_logprobs);
    sample_kernel<scalar_t><<<static_cast<unsigned>(batch), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  if (!top_in_kernel) {
    // Rare: more top log-probs than the kernel ranks in shared memory. A stable
    // descending sort keeps ties in increasing id order.
    const at::Tensor lp = at::log_softmax(logits.to(at::kFloat), 1);
    auto [values, indices] = at::sort(lp, /*stable=*/true, /*dim=*/1, /*descending=*/true);
    top_logprobs.copy_(values.narrow(1, 0, num_top_logprobs));
    top_ids.copy_(indices.narrow(1, 0, num_top_logprobs));
  }
  return {sampled, sampled_logprob, top_ids, top_logprobs};
}

}  // namespace pyserve::cuda
