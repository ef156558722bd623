// CPU layer ops around the matmuls: RMSNorm (alone, in place on strided
// heads, and fused with the residual add; Llama's weight or Gemma's
// 1 + weight), SiLU- and GELU(tanh)-and-multiply, rotary embedding. Each replaces three to
// eight elementwise torch ops (and their temporaries) with one pass over the
// rows; tokens are split across threads. Math in fp32; half-precision results
// are rounded where Hugging Face Llama rounds them (see csrc/ops_decl.inc).
#include "dispatch.h"
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/vec.h"
#include "ops.h"
#include "validate.h"

namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY {
namespace {

// Rows per thread chunk: below ~16k values a row loop is a few microseconds,
// less than waking the thread pool costs.
int64_t grain_rows(int64_t row_values) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_values)); }

// x rounded to T and back: where a half-precision model rounds an intermediate.
template <typename T>
inline float round_to(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return static_cast<float>(static_cast<T>(x));
  }
}

// One row of n values; x is fp32. offset == 0 (Llama):
// out[i] = w[i] * round_to<T>(x[i] * inv). Otherwise (Gemma):
// out[i] = T((x[i] * inv) * (offset + float(w[i]))), one rounding.
template <typename T>
inline void scale_row(const float* __restrict__ x, const T* __restrict__ w, float inv, float offset,
                      T* __restrict__ out, int64_t n) {
  if (offset != 0.f) {
    for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>((x[i] * inv) * (offset + to_float(w[i])));
  } else if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);  // vectorized by the compiler
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(to_float(w[i]) * round_to<T>(x[i] * inv));
  }
}

inline float inv_rms(const float* x, int64_t n, float eps) {
  return 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
}

// silu(g) * u for fp32 lanes; exp8 saturates, so a large |g| gives g * u or -0.
inline void silu_mul_row(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ out,
                         int64_t d) {
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (; i + 8 <= d; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < d; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// gelu_tanh(x) = 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3),
// computed as x / (1 + exp(-2u)) (the same value: 0.5 (1 + tanh(u)) is the
// logistic function of 2u), which needs one exp and has no cancellation.
// exp8 saturates, so a very negative x gives -0 like torch's formula.
constexpr float kGeluK0 = 0.7978845608028654f;             // sqrt(2 / pi)
constexpr float kGeluK1 = 0.7978845608028654f * 0.044715f;  // sqrt(2 / pi) * 0.044715

inline float gelu_tanh(float x) {
  const float u2 = -2.f * x * (kGeluK0 + kGeluK1 * x * x);
  return x / (1.f + std::exp(u2));
}

#ifdef PYSERVE_HAVE_AVX2
inline __m256 gelu_tanh8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 inner = _mm256_fmadd_ps(_mm256_set1_ps(kGeluK1), _mm256_mul_ps(x, x), _mm256_set1_ps(kGeluK0));
  const __m256 u2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(-2.f), x), inner);
  return _mm256_div_ps(x, _mm256_add_ps(one, exp8(u2)));
}
#endif

// out[i] = gelu_tanh(g[i]) * u[i] for fp32 lanes.
inline void gelu_tanh_mul_row(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ out,
                              int64_t d) {
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  for (; i + 8 <= d; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_mul_ps(gelu_tanh8(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < d; ++i) out[i] = gelu_tanh(g[i]) * u[i];
}

// out[i] = gelu_tanh(float(g[i])) for a half-precision gate, 8 lanes at a time.
template <typename T>
inline void gelu_tanh_row(const T* __restrict__ g, float* __restrict__ out, int64_t d) {
  int64_t i = 0;
#ifdef PYSERVE_HAVE_AVX2
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(out + i, gelu_tanh8(load8(g + i)));
#endif
  for (; i < d; ++i) out[i] = gelu_tanh(to_float(g[i]));
}

template <typename T>
void rotate_heads(T* __restrict__ x, int64_t heads, int64_t head_stride, int64_t half, const T* __restrict__ c,
                  const T* __restrict__ s) {
  for (int64_t h = 0; h < heads; ++h) {
    T* __restrict__ lo = x + h * head_stride;
    T* __restrict__ hi = lo + half;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = to_float(lo[i]), x2 = to_float(hi[i]), cc = to_float(c[i]), ss = to_float(s[i]);
      lo[i] = from_float<T>(x1 * cc - x2 * ss);
      hi[i] = from_float<T>(x2 * cc + x1 * ss);
    }
  }
}

// The row loops are templates (not code inside the dispatch lambdas) so that
// `if constexpr` discards the fp32-only branches for the half types.
template <typename T>
void rms_norm_rows(const T* x, int64_t in_stride, const T* w, T* out, int64_t begin, int64_t end, int64_t n,
                   float eps, float offset) {
  std::vector<float> row(std::is_same_v<T, float> ? 0 : n);
  for (int64_t r = begin; r < end; ++r) {
    const T* src = x + r * in_stride;
    const float* xf;
    if constexpr (std::is_same_v<T, float>) {
      xf = src;
    } else {
      for (int64_t i = 0; i < n; ++i) row[i] = to_float(src[i]);
      xf = row.data();
    }
    scale_row(xf, w, inv_rms(xf, n, eps), offset, out + r * n, n);
  }
}

// Rows [begin, end) of a [outer, inner, n] view (inner = 1 for 2-D), in
// place: row r is x + (r / inner) * stride0 + (r % inner) * stride1. The row
// goes through an fp32 copy, so reading and writing never alias.
template <typename T>
void rms_norm_rows_inplace(T* x, int64_t inner, int64_t stride0, int64_t stride1, const T* w, int64_t begin,
                           int64_t end, int64_t n, float eps, float offset) {
  std::vector<float> row(n);
  for (int64_t r = begin; r < end; ++r) {
    T* xr = x + (r / inner) * stride0 + (r % inner) * stride1;
    for (int64_t i = 0; i < n; ++i) row[i] = to_float(xr[i]);
    scale_row(row.data(), w, inv_rms(row.data(), n, eps), offset, xr, n);
  }
}

template <typename T>
void add_rms_norm_rows(T* x, T* res, const T* w, int64_t begin, int64_t end, int64_t n, float eps, float offset) {
  std::vector<float> row(std::is_same_v<T, float> ? 0 : n);
  for (int64_t r = begin; r < end; ++r) {
    T* xr = x + r * n;
    T* rr = res + r * n;
    const float* sum;
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t i = 0; i < n; ++i) rr[i] += xr[i];
      sum = rr;
    } else {
      for (int64_t i = 0; i < n; ++i) {
        rr[i] = static_cast<T>(to_float(xr[i]) + to_float(rr[i]));
        row[i] = to_float(rr[i]);
      }
      sum = row.data();
    }
    scale_row(sum, w, inv_rms(sum, n, eps), offset, xr, n);
  }
}

template <typename T>
void silu_and_mul_rows(const T* x, int64_t in_stride, T* out, int64_t begin, int64_t end, int64_t d) {
  for (int64_t r = begin; r < end; ++r) {
    const T* g = x + r * in_stride;
    const T* u = g + d;
    T* dst = out + r * d;
    if constexpr (std::is_same_v<T, float>) {
      silu_mul_row(g, u, dst, d);
    } else {
      for (int64_t i = 0; i < d; ++i) {
        const float gv = to_float(g[i]);
        dst[i] = static_cast<T>(round_to<T>(gv / (1.f + std::exp(-gv))) * to_float(u[i]));
      }
    }
  }
}

template <typename T>
void gelu_tanh_and_mul_rows(const T* x, int64_t in_stride, T* out, int64_t begin, int64_t end, int64_t d) {
  std::vector<float> act(std::is_same_v<T, float> ? 0 : d);
  for (int64_t r = begin; r < end; ++r) {
    const T* g = x + r * in_stride;
    const T* u = g + d;
    T* dst = out + r * d;
    if constexpr (std::is_same_v<T, float>) {
      gelu_tanh_mul_row(g, u, dst, d);
    } else {
      gelu_tanh_row(g, act.data(), d);
      for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(round_to<T>(act[i]) * to_float(u[i]));
    }
  }
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps, double weight_offset) {
  check_rms_norm(input, weight, eps, weight_offset);
  const int64_t rows = input.size(0), n = input.size(1), in_stride = input.stride(0);
  at::Tensor out = at::empty({rows, n}, input.options());
  PYSERVE_DISPATCH_FLOAT_TYPES(input.scalar_type(), "rms_norm", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
      rms_norm_rows(x, in_stride, w, o, begin, end, n, static_cast<float>(eps), static_cast<float>(weight_offset));
    });
  });
  return out;
}

void rms_norm_inplace(at::Tensor& input, const at::Tensor& weight, double eps, double weight_offset) {
  check_rms_norm_inplace(input, weight, eps, weight_offset);
  const bool three_d = input.dim() == 3;
  const int64_t inner = three_d ? input.size(1) : 1, n = input.size(-1);
  const int64_t rows = input.size(0) * inner;
  const int64_t stride0 = input.stride(0), stride1 = three_d ? input.stride(1) : 0;
  PYSERVE_DISPATCH_FLOAT_TYPES(input.scalar_type(), "rms_norm_inplace", [&] {
    scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
      rms_norm_rows_inplace(x, inner, stride0, stride1, w, begin, end, n, static_cast<float>(eps),
                            static_cast<float>(weight_offset));
    });
  });
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps,
                        double weight_offset) {
  check_fused_add_rms_norm(input, residual, weight, eps, weight_offset);
  const int64_t rows = input.size(0), n = input.size(1);
  PYSERVE_DISPATCH_FLOAT_TYPES(input.scalar_type(), "fused_add_rms_norm", [&] {
    scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* res = residual.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
      add_rms_norm_rows(x, res, w, begin, end, n, static_cast<float>(eps), static_cast<float>(weight_offset));
    });
  });
}

at::Tensor silu_and_mul(const at::Tensor& input) {
  check_silu_and_mul(input);
  const int64_t rows = input.size(0), d = input.size(1) / 2, in_stride = input.stride(0);
  at::Tensor out = at::empty({rows, d}, input.options());
  PYSERVE_DISPATCH_FLOAT_TYPES(input.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(2 * d), [&](int64_t begin, int64_t end) {
      silu_and_mul_rows(x, in_stride, o, begin, end, d);
    });
  });
  return out;
}

at::Tensor gelu_tanh_and_mul(const at::Tensor& input) {
  check_gelu_tanh_and_mul(input);
  const int64_t rows = input.size(0), d = input.size(1) / 2, in_stride = input.stride(0);
  at::Tensor out = at::empty({rows, d}, input.options());
  PYSERVE_DISPATCH_FLOAT_TYPES(input.scalar_type(), "gelu_tanh_and_mul", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(2 * d), [&](int64_t begin, int64_t end) {
      gelu_tanh_and_mul_rows(x, in_stride, o, begin, end, d);
    });
  });
  return out;
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos,
                      const at::Tensor& sin) {
  check_rotary_embedding(positions, query, key, cos, sin);
  const int64_t num_tokens = query.size(0), half = query.size(2) / 2, max_positions = cos.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_positions, "positions[", t, "] = ", pos[t],
                " is outside the rotary tables (", max_positions, " positions)");
  }
  const int64_t heads = query.size(1) + key.size(1);
  PYSERVE_DISPATCH_FLOAT_TYPES(query.scalar_type(), "rotary_embedding", [&] {
    scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* c = cos.data_ptr<scalar_t>();
    const scalar_t* s = sin.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, grain_rows(heads * 2 * half), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* ct = c + pos[t] * half;
        const scalar_t* st = s + pos[t] * half;
        rotate_heads(q + t * query.stride(0), query.size(1), query.stride(1), half, ct, st);
        rotate_heads(k + t * key.stride(0), key.size(1), key.stride(1), half, ct, st);
      }
    });
  });
}

}  // namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY
