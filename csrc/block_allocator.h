// KV-cache block allocator with a prefix cache (vLLM v1 KV cache manager
// style). Plain C++, no Python: the pybind11 binding lives in
// block_allocator_bindings.cpp.
//
// Blocks are ids 0..num_blocks-1. Each block is in exactly one state:
//   * free       ref == 0, no hash   -> on the free list (FIFO)
//   * evictable  ref == 0, hashed    -> on the LRU list (head = evicted next)
//   * in use     ref  > 0            -> on no list (hashed or not)
// Both lists are intrusive doubly-linked lists sharing one prev/next index
// array (a block is on at most one list), so every per-block operation is
// O(1); the prefix cache is an unordered_map hash -> block.
//
// Prefix-cache hashes are signed 64-bit integers (int64_t). The allocator
// never interprets them: the caller computes hash(parent hash, token ids).
//
// Errors: an id outside [0, num_blocks) throws std::out_of_range; a misuse
// (freeing/forking a block whose ref count is 0, caching a free block, ...)
// throws std::invalid_argument. Every operation that takes a list validates
// the whole list before mutating anything, so a throw leaves state intact.
// Running out of blocks is not an error: allocate() returns std::nullopt.
//
// Not thread-safe: callers serialize (the Python binding holds the GIL).
#pragma once

#include <cstdint>
#include <optional>
#include <unordered_map>
#include <vector>

namespace pybind11 {
class module_;
}

namespace pyserve {

// Registers pyserve._C.BlockAllocator on the module (block_allocator_bindings.cpp;
// called from module.cpp).
void bind_block_allocator(pybind11::module_& m);

class BlockAllocator {
 public:
  using BlockId = int32_t;
  using Hash = int64_t;
  static constexpr BlockId kNone = -1;

  struct Stats {
    int64_t allocated_blocks = 0;    // blocks handed out by allocate()
    int64_t failed_allocations = 0;  // allocate() calls that returned nullopt
    int64_t evictions = 0;           // cached blocks evicted by allocate()
    int64_t cache_queries = 0;       // hashes asked by acquire_cached/get_cached_blocks
    int64_t cache_hits = 0;          // of those, found
  };

  explicit BlockAllocator(int64_t num_blocks);

  // All-or-nothing: n blocks with ref count 1 and no hash, never-cached free
  // blocks first, then the least recently freed evictable cached blocks
  // (their hashes are dropped). nullopt when fewer than n are available.
  std::optional<std::vector<BlockId>> allocate(int64_t n);

  // Decrements each listed block's ref count, in list order. A block reaching
  // 0 goes to the free-list tail (uncached) or the LRU tail (cached). Throws,
  // without mutating, if any block would drop below 0.
  void free(const std::vector<int64_t>& block_ids);

  // Increments each listed block's ref count. Throws, without mutating, if
  // any block has ref count 0 (use acquire_cached for evictable blocks).
  void fork(const std::vector<int64_t>& block_ids);

  // Registers an in-use block under `hash`. Returns true when newly cached;
  // false when the hash already maps to a block (the existing mapping is
  // kept) or the block is already cached under this same hash. Throws if the
  // block is free or already cached under a different hash.
  bool cache_block(int64_t block_id, Hash hash);

  // Block cached under `hash`, or kNone. Touches nothing.
  BlockId lookup(Hash hash) const;

  // Like lookup, but takes a reference on the block (removing it from the
  // LRU list if it was evictable).
  BlockId acquire_cached(Hash hash);

  // acquire_cached over `hashes` until the first miss: returns the blocks of
  // the longest cached prefix, each with a reference taken.
  std::vector<BlockId> get_cached_blocks(const std::vector<Hash>& hashes);

  // Drops the hashes of all unreferenced cached blocks (they become free).
  // Returns true when the prefix cache is empty afterwards, false when
  // in-use blocks still hold hashes (those are kept).
  bool reset_prefix_cache();

  int32_t ref_count(int64_t block_id) const;
  std::optional<Hash> block_hash(int64_t block_id) const;

  int64_t num_blocks() const { return num_blocks_; }
  // What allocate() can still hand out: free + evictable.
  int64_t num_free_blocks() const { return free_list_.size + lru_list_.size; }
  int64_t num_evictable_blocks() const { return lru_list_.size; }
  int64_t num_cached_blocks() const { return static_cast<int64_t>(cache_.size()); }
  int64_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  // Fraction of blocks with ref count > 0 (0.0 when num_blocks == 0).
  double usage() const;

  const Stats& stats() const { return stats_; }
  void reset_stats() { stats_ = Stats{}; }

  // The LRU list in eviction order (next to be evicted first). O(n).
  std::vector<BlockId> evictable_blocks() const;

  // Full O(num_blocks) consistency check of lists, ref counts and the cache
  // map; throws std::logic_error on a violation. For tests and debugging.
  void check_invariants() const;

 private:
  // An intrusive doubly-linked list over the allocator's prev_/next_ arrays.
  struct List {
    BlockId head = kNone;
    BlockId tail = kNone;
    int64_t size = 0;
  };

  BlockId checked_id(int64_t block_id) const;  // throws std::out_of_range
  template <typename Check>
  void validate_counts(const std::vector<int64_t>& block_ids, Check check);
  void push_back(List& list, BlockId b);
  void unlink(List& list, BlockId b);
  BlockId pop_front(List& list);
  BlockId take_ref_on_cached(BlockId b);

  int64_t num_blocks_;
  std::vector<int32_t> ref_;
  std::vector<Hash> hash_;
  std::vector<uint8_t> hashed_;  // hash_[b] is valid
  std::vector<BlockId> prev_;
  std::vector<BlockId> next_;
  std::vector<int32_t> pending_;  // scratch for free()'s validation, all 0 at rest
  List free_list_;
  List lru_list_;
  std::unordered_map<Hash, BlockId> cache_;
  Stats stats_;
};

}  // namespace pyserve
