// The storage dtypes every kernel accepts: fp32, fp16, bf16 (no double).
#pragma once

#include <ATen/Dispatch.h>

#define PYSERVE_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                           \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
