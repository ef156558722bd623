#include "cpu/cpu_features.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <stdexcept>

#ifndef PYSERVE_CPU_X86_VARIANTS
#error "PYSERVE_CPU_X86_VARIANTS must be defined (1 where the x86 variants are compiled): see cmake/cpu_isa.cmake"
#endif
#if PYSERVE_CPU_X86_VARIANTS
#include <cpuid.h>
#endif

namespace pyserve::cpu {
namespace {

constexpr Isa kAllIsas[] = {Isa::scalar, Isa::avx2, Isa::avx512, Isa::avx512_vnni};

// What a variant needs beyond the one before it, for error messages.
const char* needs(Isa isa) {
  switch (isa) {
    case Isa::scalar:
      return "nothing";
    case Isa::avx2:
      return "AVX2, FMA and F16C";
    case Isa::avx512:
      return "AVX-512 F, BW, VL and DQ (enabled by the OS)";
    case Isa::avx512_vnni:
      return "AVX-512 VNNI";
  }
  return "?";
}

std::string join(const std::vector<Isa>& isas) {
  std::string out;
  for (Isa isa : isas) out += (out.empty() ? "" : ", ") + std::string(isa_name(isa));
  return out;
}

#if PYSERVE_CPU_X86_VARIANTS
constexpr uint64_t kXcr0Avx = 0x6;      // SSE | YMM state
constexpr uint64_t kXcr0Avx512 = 0xE6;  // + opmask | upper halves of ZMM0-15 | ZMM16-31

// XCR0 has every bit of `mask`: the OS saves those registers across context
// switches, so their instructions may be used. libgcc's __builtin_cpu_supports
// already folds this in (GCC >= 11, common/config/i386/cpuinfo.h: AVX, AVX2,
// FMA and F16C only with XCR0 SSE|YMM, every AVX-512 feature only with 0xE6;
// checked in GCC 12/13's source); repeated here so that the guarantee does
// not depend on which compiler runtime (an older libgcc, compiler-rt) we got.
bool os_enables(uint64_t mask) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return false;
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));  // xgetbv(0) = XCR0; legal once OSXSAVE is set
  return (((uint64_t{hi} << 32) | lo) & mask) == mask;
}
#endif

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar:
      return "scalar";
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    case Isa::avx512_vnni:
      return "avx512_vnni";
  }
  return "?";
}

std::vector<Isa> compiled_isas() {
#if PYSERVE_CPU_X86_VARIANTS
  return {std::begin(kAllIsas), std::end(kAllIsas)};
#else
  return {Isa::scalar};
#endif
}

Isa best_isa() {
#if PYSERVE_CPU_X86_VARIANTS
  __builtin_cpu_init();  // idempotent; libgcc's constructor may not have run before ours
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && os_enables(kXcr0Avx);
  if (!avx2) return Isa::scalar;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      os_enables(kXcr0Avx512);
  if (!avx512) return Isa::avx2;
  return __builtin_cpu_supports("avx512vnni") ? Isa::avx512_vnni : Isa::avx512;
#else
  return Isa::scalar;
#endif
}

bool has_avx512_bf16() {
#if PYSERVE_CPU_X86_VARIANTS
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && os_enables(kXcr0Avx512);
#else
  return false;
#endif
}

Isa resolve_isa(std::string_view requested, Isa best) {
  if (requested.empty()) return best;
  const std::vector<Isa> compiled = compiled_isas();
  const std::string asked = "PYSERVE_CPU_ISA=" + std::string(requested);
  for (Isa isa : kAllIsas) {
    if (requested != isa_name(isa)) continue;
    if (std::find(compiled.begin(), compiled.end(), isa) == compiled.end()) {
      throw std::runtime_error(asked + ": this build has no " + isa_name(isa) + " kernels (it has: " +
                               join(compiled) + "). Unset PYSERVE_CPU_ISA or pick one of those.");
    }
    if (isa > best) {
      std::string missing;
      for (Isa step : kAllIsas) {
        if (step > best && step <= isa) missing += (missing.empty() ? "" : " plus ") + std::string(needs(step));
      }
      std::vector<Isa> runnable;
      for (Isa c : compiled) {
        if (c <= best) runnable.push_back(c);
      }
      throw std::runtime_error(asked + ": this CPU cannot run the " + isa_name(isa) + " kernels, which need " +
                               missing + "; the widest it runs is " + isa_name(best) +
                               ". Unset PYSERVE_CPU_ISA or set it to one of: " + join(runnable) + ".");
    }
    return isa;
  }
  throw std::runtime_error(asked + " is not a CPU kernel variant; this build has: " + join(compiled) +
                           " (unset it to use the widest this CPU runs).");
}

Isa active_isa() {
  // A function-local static: initialized once, thread-safely, on first use.
  // If resolve_isa throws, it stays uninitialized and the next call throws too.
  static const Isa isa = [] {
    const char* env = std::getenv("PYSERVE_CPU_ISA");
    return resolve_isa(env ? env : "", best_isa());
  }();
  return isa;
}

}  // namespace pyserve::cpu
