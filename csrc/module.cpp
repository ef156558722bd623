// The Python module pyserve._C: importing it registers the torch ops (static
// initializers in the other translation units) and exposes what is not a
// tensor op: the block allocator and the build description.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "block_allocator.h"
#include "cpu/cpu_features.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  // The CPU kernel variant in use (cpu/cpu_features.h), the ones compiled in
  // and the widest this CPU runs.
  info["cpu_isa"] = pyserve::cpu::isa_name(pyserve::cpu::active_isa());
  py::list variants;
  for (pyserve::cpu::Isa isa : pyserve::cpu::compiled_isas()) variants.append(pyserve::cpu::isa_name(isa));
  info["cpu_isa_variants"] = variants;
  info["cpu_isa_best"] = pyserve::cpu::isa_name(pyserve::cpu::best_isa());
  // Whether the CPU has AVX512_BF16: --kv-cache-dtype auto's choice on the CPU.
  info["cpu_avx512_bf16"] = pyserve::cpu::has_avx512_bf16();
  info["torch_version"] = PYSERVE_TORCH_VERSION;
#ifdef PYSERVE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = PYSERVE_CUDA_VERSION;
  py::list archs;
  std::string csv = PYSERVE_CUDA_ARCHS;
  size_t start = 0;
  while (start < csv.size()) {
    size_t end = csv.find(',', start);
    if (end == std::string::npos) end = csv.size();
    archs.append(csv.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::list();
#endif
  return info;
}

// For tests: resolve_isa() for a CPU other than this one ("avx2" = a CPU
// whose widest variant is avx2). Returns the variant's name or raises
// RuntimeError with the message an import would give.
std::string resolve_cpu_isa(const std::string& requested, const std::string& best) {
  for (pyserve::cpu::Isa isa : {pyserve::cpu::Isa::scalar, pyserve::cpu::Isa::avx2, pyserve::cpu::Isa::avx512,
                                pyserve::cpu::Isa::avx512_vnni}) {
    if (best == pyserve::cpu::isa_name(isa)) return pyserve::cpu::isa_name(pyserve::cpu::resolve_isa(requested, isa));
  }
  throw py::value_error("best must be a variant name, got '" + best + "'");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyserve kernels: paged attention, KV-cache ops, sampling, block allocation";
  // Decide the CPU kernel variant now: a bad PYSERVE_CPU_ISA (unknown, or
  // more than this CPU runs) is an ImportError with active_isa()'s message,
  // not an error at the first op.
  pyserve::cpu::active_isa();
  m.def("build_info", &build_info, "What this extension was compiled with (CPU ISA variants and the active one, CUDA and its archs).");
  m.def("_resolve_cpu_isa", &resolve_cpu_isa, py::arg("requested"), py::arg("best"),
        "Test hook: the CPU kernel variant PYSERVE_CPU_ISA=requested selects on a CPU whose widest is best.");
  pyserve::bind_block_allocator(m);
}
