#include "block_allocator.h"

namespace pyserve {

void bind_block_allocator(pybind11::module_& m) {}  // STUB: being written

}  // namespace pyserve
