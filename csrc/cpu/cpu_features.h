// Which compiled variant of the CPU kernels runs. The kernels that have
// ISA-specific code are compiled once per variant (cmake/cpu_isa.cmake), each
// into its own namespace pyserve::cpu::<variant>; PYSERVE_CPU_DISPATCH
// (cpu/cpu_dispatch.h) calls the one active_isa() names. This file is
// compiled once, for the baseline x86-64 ISA, like everything that runs
// before the CPU's features are known.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace pyserve::cpu {

// Each variant can run everything the ones before it can.
//   scalar       baseline x86-64 (SSE2), or any other architecture
//   avx2         + AVX2, FMA, F16C
//   avx512       + AVX-512 F, BW, VL, DQ
//   avx512_vnni  + AVX-512 VNNI (int8 dot products)
enum class Isa { scalar, avx2, avx512, avx512_vnni };

const char* isa_name(Isa isa);

// The variants compiled into this build: all four on x86-64, scalar elsewhere.
std::vector<Isa> compiled_isas();

// The widest variant this CPU can run, the OS included: AVX state must be
// enabled in XCR0 (a kernel or hypervisor may leave AVX-512 off even when
// cpuid reports it).
Isa best_isa();

// The CPU converts and multiplies bf16 natively (AVX512_BF16, enabled by the
// OS): where it does, --kv-cache-dtype auto picks a bf16 KV cache
// (pyserve/engine/kv_cache_dtype.py), as PyTorch's CPU bf16 paths do.
bool has_avx512_bf16();

// The variant the kernels use: PYSERVE_CPU_ISA if set (read once), else
// best_isa(). The first call decides; it throws std::runtime_error (and so
// does every later call) for an unknown name or a variant this CPU or build
// cannot run. pyserve._C calls it at import so that surfaces as an ImportError.
Isa active_isa();

// active_isa()'s decision, without the environment or the CPU: `requested`
// is PYSERVE_CPU_ISA's value ("" = unset), `best` what best_isa() returned.
// Separate so that tests can ask about CPUs other than the one they run on.
Isa resolve_isa(std::string_view requested, Isa best);

}  // namespace pyserve::cpu
