#pragma once

#include <pybind11/pybind11.h>

namespace pyserve {

// Registers the BlockAllocator class on the module.
void bind_block_allocator(pybind11::module_& m);

}  // namespace pyserve
