# The CPU kernels are compiled once per x86 ISA variant and the variant is
# chosen at run time (PyTorch's CPU_CAPABILITY scheme), so one build runs on
# any x86-64 and uses the widest vectors the CPU has:
#
#   variant      compiled with                                  chosen when the CPU has
#   scalar       the baseline x86-64 ISA (SSE2)                 -
#   avx2         -mavx2 -mfma -mf16c                            AVX2, FMA, F16C
#   avx512       avx2's + -mavx512f -mavx512bw -mavx512vl       + AVX-512 F/BW/VL/DQ
#                -mavx512dq                                       (and the OS enables them)
#   avx512_vnni  avx512's + -mavx512vnni                        + AVX-512 VNNI
#
# Elsewhere than x86-64 only `scalar` is compiled. csrc/cpu/cpu_features.h
# picks the variant (PYSERVE_CPU_ISA=<variant> forces one at run time).
#
# Everything else (bindings, validation, block allocator, op registration,
# the dispatcher, cpu_features.cpp) is compiled once, for the baseline: it
# runs before and around the CPU check, so it must never hold an AVX
# instruction. tests/kernels/test_cpu_isa.py disassembles the built extension
# to check that only the variants' code does.
#
# To opt a source file in (it has intrinsics under #ifdef __AVX2__ and the
# like, or loops the compiler should vectorize wider), as csrc/cpu/quant/ does:
#   1. add it to PYSERVE_CPU_KERNEL_SOURCES in CMakeLists.txt (one list);
#   2. put its code in namespace pyserve::cpu::PYSERVE_CPU_CAPABILITY (the
#      macro is the variant's name), so that each compile has its own
#      symbols; cpu/vec.h's helpers live there too;
#   3. declare its entry points in every variant's namespace (ops.h includes
#      ops_decl.inc once per variant; do the same with your own .inc) and call
#      them from baseline code through PYSERVE_CPU_DISPATCH(fn, args...)
#      (cpu/cpu_dispatch.h), which calls cpu::active_isa()'s variant;
#   4. give it no dynamic initialization at namespace scope (a global
#      std::vector, an object with a constructor): that runs at import, on
#      any CPU, compiled with the variant's flags. constexpr tables are fine.
# Inline functions and templates from headers outside that namespace (std::,
# c10::) are still compiled into every variant, and the linker keeps the
# first copy of each it sees. So each variant is a static library, linked
# after the target's own (baseline) objects and in order from narrowest to
# widest: a copy the linker keeps is compiled for the narrowest ISA among its
# callers. (Object libraries would not do: CMake puts their objects on the
# link line ahead of the target's own.)

# The variants this target architecture gets, narrowest first.
function(pyserve_cpu_variants out_variants)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
    set(${out_variants} scalar avx2 avx512 avx512_vnni PARENT_SCOPE)
  else()
    set(${out_variants} scalar PARENT_SCOPE)
  endif()
endfunction()

function(pyserve_cpu_variant_flags variant out_flags)
  set(_avx2 -mavx2 -mfma -mf16c)
  set(_avx512 ${_avx2} -mavx512f -mavx512bw -mavx512vl -mavx512dq)
  if(variant STREQUAL "scalar")
    set(_flags "")
  elseif(variant STREQUAL "avx2")
    set(_flags ${_avx2})
  elseif(variant STREQUAL "avx512")
    set(_flags ${_avx512})
  elseif(variant STREQUAL "avx512_vnni")
    set(_flags ${_avx512} -mavx512vnni)
  else()
    message(FATAL_ERROR "pyserve: unknown CPU variant '${variant}'")
  endif()
  set(${out_flags} ${_flags} PARENT_SCOPE)
endfunction()

# Compile `sources` once per variant, each into a static library
# <target>_cpu_<variant> with PYSERVE_CPU_CAPABILITY=<variant> and the
# variant's flags, and link them into `target` after its own objects,
# narrowest variant first. The libraries' names go to `out_libs`, for the
# caller to give them the settings (include dirs, torch, OpenMP) `target` has.
function(pyserve_add_cpu_variants target out_libs)
  pyserve_cpu_variants(_variants)
  set(_libs "")
  foreach(_v IN LISTS _variants)
    set(_lib ${target}_cpu_${_v})
    add_library(${_lib} STATIC ${ARGN})
    pyserve_cpu_variant_flags(${_v} _flags)
    target_compile_definitions(${_lib} PRIVATE PYSERVE_CPU_CAPABILITY=${_v})
    target_compile_options(${_lib} PRIVATE ${_flags})
    list(APPEND _libs ${_lib})
  endforeach()
  target_link_libraries(${target} PRIVATE ${_libs})
  set(${out_libs} ${_libs} PARENT_SCOPE)
endfunction()
