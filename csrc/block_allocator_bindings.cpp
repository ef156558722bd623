// pybind11 binding of pyserve::BlockAllocator as pyserve._C.BlockAllocator.
// C++ exceptions surface as: std::invalid_argument -> ValueError,
// std::out_of_range -> IndexError, std::overflow_error -> OverflowError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "block_allocator.h"

namespace py = pybind11;

namespace pyserve {

namespace {

// Prefix-cache hashes are int64: any Python int (or object with __index__)
// in [-2**63, 2**63 - 1]; anything else raises TypeError / OverflowError
// naming the value, instead of pybind11's generic "incompatible arguments".
BlockAllocator::Hash to_hash(py::handle obj) {
  PyObject* index = PyNumber_Index(obj.ptr());
  if (index == nullptr) {
    PyErr_Clear();
    throw py::type_error("block hash must be an int, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(index, &overflow);
  Py_DECREF(index);
  if (overflow != 0) {
    PyErr_Clear();
    PyErr_Format(PyExc_OverflowError,
                 "block hash %R does not fit in int64 (hashes are signed 64-bit; "
                 "mask or fold wider digests, e.g. h & ((1 << 63) - 1))",
                 obj.ptr());
    throw py::error_already_set();
  }
  if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<BlockAllocator::Hash>(value);
}

}  // namespace

void bind_block_allocator(py::module_& m) {
  using A = BlockAllocator;
  py::class_<A>(m, "BlockAllocator", R"doc(
KV-cache block allocator with a prefix cache (vLLM v1 KV cache manager style).

Blocks are ids 0..num_blocks-1, each with a reference count and an optional
prefix-cache hash. A block is free (ref 0, uncached), evictable (ref 0, cached:
on an LRU list) or in use (ref > 0). Every per-block operation is O(1).

Hashes are signed 64-bit ints (Python's hash() of a tuple fits; fold or mask
wider digests). Out-of-range block ids raise IndexError; misuse (double free,
forking a free block, ...) raises ValueError; both name the block, and list
operations validate the whole list first, so a raise leaves state intact.
Running out of blocks is not an error: allocate returns None.
)doc")
      .def(py::init<int64_t>(), py::arg("num_blocks"),
           "Create an allocator over blocks 0..num_blocks-1, all free.")
      .def("allocate", &A::allocate, py::arg("n"),
           "Allocate n blocks (ref count 1, no hash), all or nothing: free never-cached "
           "blocks first (FIFO), then the least recently freed evictable cached blocks, whose "
           "hashes are dropped. Returns the list of ids, or None if fewer than n are available "
           "(state unchanged).")
      .def("free", &A::free, py::arg("block_ids"),
           "Drop one reference per listed id, in list order. A block reaching ref 0 goes to "
           "the free-list tail (uncached) or the LRU tail (cached, evicted last-in-last-out: "
           "free a sequence's blocks in reverse to have its tail evicted first). Raises "
           "ValueError naming the block if any id would drop below 0 (double free), "
           "IndexError for an id out of range; nothing is changed then.")
      .def("fork", &A::fork, py::arg("block_ids"),
           "Add one reference per listed id (share blocks with another sequence). Raises "
           "ValueError if a block has ref count 0 (use acquire_cached for evictable "
           "blocks); nothing is changed then.")
      .def(
          "cache_block",
          [](A& self, int64_t block_id, py::handle hash) {
            return self.cache_block(block_id, to_hash(hash));
          },
          py::arg("block_id"), py::arg("hash"),
          "Register an in-use (full) block under hash. Returns True when newly cached; "
          "False if the hash already maps to a block (that mapping is kept; keep using your "
          "own block) or this block is already cached under this hash. Raises ValueError if "
          "the block is free or already cached under another hash.")
      .def(
          "lookup", [](const A& self, py::handle hash) { return self.lookup(to_hash(hash)); },
          py::arg("hash"), "Block cached under hash, or -1. Changes nothing.")
      .def(
          "acquire_cached",
          [](A& self, py::handle hash) { return self.acquire_cached(to_hash(hash)); },
          py::arg("hash"),
          "Block cached under hash with one reference taken (removed from the LRU list if "
          "it was evictable), or -1 if absent.")
      .def(
          "get_cached_blocks",
          [](A& self, py::iterable hashes) {
            std::vector<A::Hash> hs;
            for (py::handle h : hashes) hs.push_back(to_hash(h));
            return self.get_cached_blocks(hs);
          },
          py::arg("hashes"),
          "Prefix-cache lookup: acquire_cached over hashes (a sequence's block hashes in "
          "order) until the first miss. Returns the blocks of the longest cached prefix, "
          "each with a reference taken (release with free). O(1) per block.")
      .def("reset_prefix_cache", &A::reset_prefix_cache,
           "Drop the hashes of all unreferenced cached blocks (they become free, in LRU "
           "order). Returns True if the prefix cache is now empty, False if in-use blocks "
           "still hold hashes (those are kept).")
      .def("ref_count", &A::ref_count, py::arg("block_id"), "Reference count of a block.")
      .def("block_hash", &A::block_hash, py::arg("block_id"),
           "Prefix-cache hash of a block, or None if it is not cached.")
      .def_property_readonly("num_blocks", &A::num_blocks, "Total number of blocks.")
      .def_property_readonly("num_free_blocks", &A::num_free_blocks,
                             "Blocks allocate can still hand out: free + evictable.")
      .def_property_readonly("num_evictable_blocks", &A::num_evictable_blocks,
                             "Unreferenced cached blocks (on the LRU list).")
      .def_property_readonly("num_cached_blocks", &A::num_cached_blocks,
                             "Blocks holding a prefix-cache hash (in use or evictable).")
      .def_property_readonly("num_used_blocks", &A::num_used_blocks,
                             "Blocks with ref count > 0.")
      .def("usage", &A::usage, "Fraction of blocks with ref count > 0 (0.0 if num_blocks == 0).")
      .def("evictable_blocks", &A::evictable_blocks,
           "The evictable blocks in eviction order (next to be evicted first). O(n); for "
           "tests and debugging.")
      .def(
          "stats",
          [](const A& self) {
            const A::Stats& s = self.stats();
            py::dict d;
            d["allocated_blocks"] = s.allocated_blocks;
            d["failed_allocations"] = s.failed_allocations;
            d["evictions"] = s.evictions;
            d["cache_queries"] = s.cache_queries;
            d["cache_hits"] = s.cache_hits;
            return d;
          },
          "Counters since creation or reset_stats(): allocated_blocks, failed_allocations, "
          "evictions, cache_queries and cache_hits (acquire_cached / get_cached_blocks).")
      .def("reset_stats", &A::reset_stats, "Zero the stats() counters.")
      .def("check_invariants", &A::check_invariants,
           "O(num_blocks) consistency check of lists, ref counts and the hash map; raises "
           "RuntimeError on a violation. For tests and debugging.")
      .def("__len__", &A::num_blocks)
      .def("__repr__", [](const A& self) {
        return "BlockAllocator(num_blocks=" + std::to_string(self.num_blocks()) +
               ", free=" + std::to_string(self.num_free_blocks() - self.num_evictable_blocks()) +
               ", evictable=" + std::to_string(self.num_evictable_blocks()) +
               ", used=" + std::to_string(self.num_used_blocks()) +
               ", cached=" + std::to_string(self.num_cached_blocks()) + ")";
      });
}

}  // namespace pyserve
