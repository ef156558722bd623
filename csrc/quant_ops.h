// Quantized-weight ops (issue 16): GGUF block formats kept quantized in
// memory and multiplied by kernels of our own. CPU only by design (on CUDA the
// weights are dequantized at load), so they live here rather than in
// ops_decl.inc, which is declared for both device namespaces. Formats:
// csrc/cpu/quant/formats.cpp; layout and arithmetic: csrc/cpu/quant/block32.h.
//
// As with ops.h: pyserve::cpu's ops (csrc/cpu/quant/dispatch.cpp, compiled
// once for the baseline ISA) call the same op of the active ISA variant,
// pyserve::cpu::<variant> (csrc/cpu/quant/ops.cpp and the kernels, compiled
// once per variant; cmake/cpu_isa.cmake). The packed layout is the same in
// every variant, so a weight packed under one variant runs under any.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#define PYSERVE_OPS_DECL "quant_ops_decl.inc"
#include "cpu/declare_per_variant.inc"
#undef PYSERVE_OPS_DECL
