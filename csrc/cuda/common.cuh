// Helpers shared by the CUDA kernels: dtype conversion, warp reductions,
// vector-width selection for byte copies.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pyserve::cuda {

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Largest power-of-two unit (<= 16 bytes) dividing every given byte quantity.
inline int copy_unit(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t d) {
  const std::uintptr_t all = a | b | c | d;
  for (int unit = 16; unit > 1; unit >>= 1) {
    if (all % unit == 0) return unit;
  }
  return 1;
}

template <int kUnit>
struct CopyType;
template <>
struct CopyType<16> { using type = uint4; };
template <>
struct CopyType<8> { using type = uint2; };
template <>
struct CopyType<4> { using type = uint32_t; };
template <>
struct CopyType<2> { using type = uint16_t; };
template <>
struct CopyType<1> { using type = uint8_t; };

// Calls f.template operator()<kUnit>() with the runtime unit as a constant.
template <typename F>
void dispatch_copy_unit(int unit, F&& f) {
  switch (unit) {
    case 16: f.template operator()<16>(); break;
    case 8: f.template operator()<8>(); break;
    case 4: f.template operator()<4>(); break;
    case 2: f.template operator()<2>(); break;
    default: f.template operator()<1>(); break;
  }
}

}  // namespace pyserve::cuda
