// PYSERVE_CPU_DISPATCH(fn, args...) calls pyserve::cpu::<variant>::fn(args...)
// for the variant active_isa() names. For code compiled once (for the
// baseline ISA) that calls into a source compiled once per ISA variant
// (PYSERVE_CPU_KERNEL_SOURCES, cmake/cpu_isa.cmake); fn must be declared in
// every variant's namespace (csrc/ops.h does it for the ops).
#pragma once

#include "cpu/cpu_features.h"

#ifndef PYSERVE_CPU_X86_VARIANTS
#error "PYSERVE_CPU_X86_VARIANTS must be defined (1 where the x86 variants are compiled): see cmake/cpu_isa.cmake"
#endif

#if PYSERVE_CPU_X86_VARIANTS
#define PYSERVE_CPU_DISPATCH(FN, ...)                       \
  [&]() -> decltype(auto) {                                 \
    switch (::pyserve::cpu::active_isa()) {                 \
      case ::pyserve::cpu::Isa::avx512_vnni:                \
        return ::pyserve::cpu::avx512_vnni::FN(__VA_ARGS__); \
      case ::pyserve::cpu::Isa::avx512:                     \
        return ::pyserve::cpu::avx512::FN(__VA_ARGS__);     \
      case ::pyserve::cpu::Isa::avx2:                       \
        return ::pyserve::cpu::avx2::FN(__VA_ARGS__);       \
      case ::pyserve::cpu::Isa::scalar:                     \
        break;                                              \
    }                                                       \
    return ::pyserve::cpu::scalar::FN(__VA_ARGS__);         \
  }()
#else
#define PYSERVE_CPU_DISPATCH(FN, ...) ::pyserve::cpu::scalar::FN(__VA_ARGS__)
#endif
