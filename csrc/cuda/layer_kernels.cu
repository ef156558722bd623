// CUDA layer ops around the matmuls: RMSNorm (alone, in place on strided
// heads, and fused with the residual add; Llama's weight or Gemma's
// 1 + weight), SiLU- and GELU(tanh)-and-multiply, rotary embedding. One
// launch each instead of three to eight elementwise launches: at decode batch
// sizes a step is bound by launches, not bytes. One thread block per token
// row (one warp per head for the in-place per-head norm); math in fp32,
// half-precision results rounded where Hugging Face Llama (Gemma, with a
// weight offset) rounds them (see csrc/ops_decl.inc).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "cuda/common.cuh"
#include "dispatch.h"
#include "ops.h"
#include "validate.h"

namespace pyserve::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// Sum of v over the block (kThreads threads); every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float partial[kThreads / kWarpSize];
  __shared__ float total;
  v = warp_sum(v);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < kThreads / kWarpSize ? partial[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

// The normalized, weighted value of x: Llama's rounding with offset 0,
// Gemma's (all fp32, one rounding) otherwise; see csrc/ops_decl.inc.
template <typename T>
__device__ __forceinline__ T norm_out(float x, float inv, float w, float offset) {
  return offset != 0.f ? from_float<T>((x * inv) * (offset + w)) : from_float<T>(w * round_to<T>(x * inv));
}

// One block per row. out = weight * round(x * inv_rms) (or Gemma's form).
template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ input, int64_t in_stride, const T* __restrict__ weight,
                                T* __restrict__ out, int64_t n, float eps, float offset) {
  const T* x = input + blockIdx.x * in_stride;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float v = to_float(x[i]);
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss) / static_cast<float>(n) + eps);
  T* o = out + blockIdx.x * n;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    o[i] = norm_out<T>(to_float(x[i]), inv, to_float(weight[i]), offset);
  }
}

// In place over rows of a [outer, inner, n] view (inner = 1 for 2-D); row r
// is x + (r / inner) * stride0 + (r % inner) * stride1. kRowThreads threads
// per row: a warp for head-sized rows (8 rows per block), the whole block
// for long ones. Each thread rewrites only the elements it read itself.
template <typename T, int kRowThreads>
__global__ void __launch_bounds__(kThreads) rms_norm_inplace_kernel(T* x, int64_t rows, int64_t inner, int64_t stride0,
                                                                   int64_t stride1, const T* __restrict__ weight,
                                                                   int64_t n, float eps, float offset) {
  static_assert(kRowThreads == kWarpSize || kRowThreads == kThreads, "a warp or the block per row");
  constexpr int kRowsPerBlock = kThreads / kRowThreads;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads;
  const int lane = threadIdx.x % kRowThreads;
  if (kRowThreads == kWarpSize && r >= rows) return;  // whole warps only: the warp reduction stays full
  T* xr = x + (r / inner) * stride0 + (r % inner) * stride1;
  float ss = 0.f;
  for (int64_t i = lane; i < n; i += kRowThreads) {
    const float v = to_float(xr[i]);
    ss += v * v;
  }
  if constexpr (kRowThreads == kWarpSize) {
    ss = warp_sum(ss);
  } else {
    ss = block_sum(ss);
  }
  const float inv = rsqrtf(ss / static_cast<float>(n) + eps);
  for (int64_t i = lane; i < n; i += kRowThreads) {
    xr[i] = norm_out<T>(to_float(xr[i]), inv, to_float(weight[i]), offset);
  }
}

// One block per row. residual = round(input + residual); input = rms_norm(residual).
template <typename T>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ input, T* __restrict__ residual,
                                          const T* __restrict__ weight, int64_t n, float eps, float offset) {
  T* x = input + blockIdx.x * n;
  T* r = residual + blockIdx.x * n;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const T sum = from_float<T>(to_float(x[i]) + to_float(r[i]));
    r[i] = sum;
    const float v = to_float(sum);
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss) / static_cast<float>(n) + eps);
  // Each thread reads back only the elements it wrote itself: no barrier needed.
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    x[i] = norm_out<T>(to_float(r[i]), inv, to_float(weight[i]), offset);
  }
}

template <typename T>
__global__ void silu_and_mul_kernel(const T* __restrict__ input, int64_t in_stride, T* __restrict__ out, int64_t d) {
  const T* g = input + blockIdx.x * in_stride;
  const T* u = g + d;
  T* o = out + blockIdx.x * d;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    const float gv = to_float(g[i]);
    o[i] = from_float<T>(round_to<T>(gv / (1.f + __expf(-gv))) * to_float(u[i]));
  }
}

// torch's gelu(approximate="tanh") formula, in fp32, then rounded like silu.
template <typename T>
__global__ void gelu_tanh_and_mul_kernel(const T* __restrict__ input, int64_t in_stride, T* __restrict__ out,
                                         int64_t d) {
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  const T* g = input + blockIdx.x * in_stride;
  const T* u = g + d;
  T* o = out + blockIdx.x * d;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    const float gv = to_float(g[i]);
    const float act = 0.5f * gv * (1.f + tanhf(kBeta * (gv + kKappa * gv * gv * gv)));
    o[i] = from_float<T>(round_to<T>(act) * to_float(u[i]));
  }
}

// One block per token; thread j rotates pair j of the token's query and key heads.
template <typename T>
__global__ void rotary_kernel(const int64_t* __restrict__ positions, T* __restrict__ query, int64_t q_stride,
                              int64_t q_heads, T* __restrict__ key, int64_t k_stride, int64_t k_heads,
                              const T* __restrict__ cos, const T* __restrict__ sin, int64_t half,
                              int64_t max_positions) {
  const int64_t pos = positions[blockIdx.x];
  if (pos < 0 || pos >= max_positions) return;  // left as it is (see ops_decl.inc)
  const T* c = cos + pos * half;
  const T* s = sin + pos * half;
  const int64_t pairs = (q_heads + k_heads) * half;
  for (int64_t j = threadIdx.x; j < pairs; j += kThreads) {
    const int64_t head = j / half, i = j % half;
    T* x = head < q_heads ? query + blockIdx.x * q_stride + head * 2 * half
                          : key + blockIdx.x * k_stride + (head - q_heads) * 2 * half;
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]), cc = to_float(c[i]), ss = to_float(s[i]);
    x[i] = from_float<T>(x1 * cc - x2 * ss);
    x[i + half] = from_float<T>(x2 * cc + x1 * ss);
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps, double weight_offset) {
  check_rms_norm(input, weight, eps, weight_offset);
  const int64_t rows = input.size(0), n = input.size(1);
  at::Tensor out = at::empty({rows, n}, input.options());
  if (rows == 0 || n == 0) return out;
  const c10::cuda::CUDAGuard guard(input.device());
  PYSERVE_DISPATCH_FLOAT_TYPES(input.scalar_type(), "rms_norm", [&] {
    rms_norm_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input.data_ptr<scalar_t>(), input.stride(0), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
        static_cast<float>(eps), static_cast<float>(weight_offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void rms_norm_inplace(at::Tensor& input, const at::Tensor& weight, double eps, double weight_offset) {
  check_rms_norm_inplace(input, weight, eps, weight_offset);
  const bool three_d = input.dim() == 3;
  const int64_t inner = three_d ? input.size(1) : 1, n = input.size(-1);
  const int64_t rows = input.size(0) * inner;
  if (rows == 0 || n == 0) return;
  const int64_t stride0 = input.stride(0), stride1 = three_d ? input.stride(1) : 0;
  const c10::cuda::CUDAGuard guard(input.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int64_t kWarpRows = kThreads / kWarpSize;
  // A warp per row up to 1024 values (32 per lane), the block beyond.
  const bool per_warp = n <= 1024;
  const int64_t blocks = per_warp ? (rows + kWarpRows - 1) / kWarpRows : rows;
  TORCH_CHECK(blocks <= 0x7fffffffll, "rms_norm_inplace: too many rows (", rows, ")");
  PYSERVE_DISPATCH_FLOAT_TYPES(input.scalar_type(), "rms_norm_inplace", [&] {
    if (per_warp) {
      rms_norm_inplace_kernel<scalar_t, kWarpSize><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          input.data_ptr<scalar_t>(), rows, inner, stride0, stride1, weight.data_ptr<scalar_t>(), n,
          static_cast<float>(eps), static_cast<float>(weight_offset));
    } else {
      rms_norm_inplace_kernel<scalar_t, kThreads><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          input.data_ptr<scalar_t>(), rows, inner, stride0, stride1, weight.data_ptr<scalar_t>(), n,
          static_cast<float>(eps), static_cast<float>(weight_offset));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps,
                        double weight_offset) {
  check_fused_add_rms_norm(input, residual, weight, eps, weight_offset);
  const int64_t rows = input.size(0), n = input.size(1);
  if (rows == 0 || n == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  PYSERVE_DISPATCH_FLOAT_TYPES(input.scalar_type(), "fused_add_rms_norm", [&] {
    fused_add_rms_norm_kernel<scalar_t>
        <<<static_cast<unsigned>(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            input.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), n,
            static_cast<float>(eps), static_cast<float>(weight_offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor silu_and_mul(const at::Tensor& input) {
  check_silu_and_mul(input);
  const int64_t rows = input.size(0), d = input.size(1) / 2;
  at::Tensor out = at::empty({rows, d}, input.options());
  if (rows == 0 || d == 0) return out;
  const c10::cuda::CUDAGuard guard(input.device());
  PYSERVE_DISPATCH_FLOAT_TYPES(input.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input.data_ptr<scalar_t>(), input.stride(0), out.data_ptr<scalar_t>(), d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gelu_tanh_and_mul(const at::Tensor& input) {
  check_gelu_tanh_and_mul(input);
  const int64_t rows = input.size(0), d = input.size(1) / 2;
  at::Tensor out = at::empty({rows, d}, input.options());
  if (rows == 0 || d == 0) return out;
  const c10::cuda::CUDAGuard guard(input.device());
  PYSERVE_DISPATCH_FLOAT_TYPES(input.scalar_type(), "gelu_tanh_and_mul", [&] {
    gelu_tanh_and_mul_kernel<scalar_t>
        <<<static_cast<unsigned>(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            input.data_ptr<scalar_t>(), input.stride(0), out.data_ptr<scalar_t>(), d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos,
                      const at::Tensor& sin) {
  check_rotary_embedding(positions, query, key, cos, sin);
  const int64_t num_tokens = query.size(0), half = query.size(2) / 2;
  if (num_tokens == 0 || half == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  PYSERVE_DISPATCH_FLOAT_TYPES(query.scalar_type(), "rotary_embedding", [&] {
    rotary_kernel<scalar_t><<<static_cast<unsigned>(num_tokens), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        positions.data_ptr<int64_t>(), query.data_ptr<scalar_t>(), query.stride(0), query.size(1),
        key.data_ptr<scalar_t>(), key.stride(0), key.size(1), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
        half, cos.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace pyserve::cuda
