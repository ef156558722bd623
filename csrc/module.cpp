// The Python module pyserve._C: importing it registers the torch ops (static
// initializers in the other translation units) and exposes what is not a
// tensor op: the block allocator and the build description.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_allocator.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["cpu_isa"] = PYSERVE_CPU_ISA;
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyserve kernels: paged attention, KV-cache ops, sampling, block allocation";
  m.def("build_info", &build_info, "What this extension was compiled with (CPU ISA, CUDA and its archs).");
  pyserve::bind_block_allocator(m);
}
