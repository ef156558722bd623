// BlockAllocator: see block_allocator.h for the model and the invariants.
#include "block_allocator.h"

#include <limits>
#include <stdexcept>
#include <string>

namespace pyserve {

namespace {

std::string block_str(int64_t b) { return "block " + std::to_string(b); }

}  // namespace

BlockAllocator::BlockAllocator(int64_t num_blocks) : num_blocks_(num_blocks) {
  if (num_blocks < 0 || num_blocks > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("BlockAllocator: num_blocks must be in [0, 2^31 - 1], got " +
                                std::to_string(num_blocks));
  }
  const auto n = static_cast<size_t>(num_blocks);
  ref_.assign(n, 0);
  hash_.assign(n, 0);
  hashed_.assign(n, 0);
  prev_.assign(n, kNone);
  next_.assign(n, kNone);
  pending_.assign(n, 0);
  cache_.reserve(n);
  for (BlockId b = 0; b < static_cast<BlockId>(num_blocks); ++b) push_back(free_list_, b);
}

// ---- intrusive lists -------------------------------------------------------

void BlockAllocator::push_back(List& list, BlockId b) {
  prev_[b] = list.tail;
  next_[b] = kNone;
  if (list.tail != kNone) {
    next_[list.tail] = b;
  } else {
    list.head = b;
  }
  list.tail = b;
  ++list.size;
}

void BlockAllocator::unlink(List& list, BlockId b) {
  const BlockId p = prev_[b];
  const BlockId n = next_[b];
  if (p != kNone) {
    next_[p] = n;
  } else {
    list.head = n;
  }
  if (n != kNone) {
    prev_[n] = p;
  } else {
    list.tail = p;
  }
  prev_[b] = next_[b] = kNone;
  --list.size;
}

BlockAllocator::BlockId BlockAllocator::pop_front(List& list) {
  const BlockId b = list.head;
  if (b != kNone) unlink(list, b);
  return b;
}

// ---- operations ------------------------------------------------------------

BlockAllocator::BlockId BlockAllocator::checked_id(int64_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks_) {
    throw std::out_of_range(block_str(block_id) + " is out of range [0, " +
                            std::to_string(num_blocks_) + ")");
  }
  return static_cast<BlockId>(block_id);
}

std::optional<std::vector<BlockAllocator::BlockId>> BlockAllocator::allocate(int64_t n) {
  if (n < 0) throw std::invalid_argument("allocate: n must be >= 0, got " + std::to_string(n));
  if (n > num_free_blocks()) {
    ++stats_.failed_allocations;
    return std::nullopt;
  }
  std::vector<BlockId> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    BlockId b = pop_front(free_list_);
    if (b == kNone) {
      // Evict the least recently freed cached block.
      b = pop_front(lru_list_);
      cache_.erase(hash_[b]);
      hashed_[b] = 0;
      hash_[b] = 0;
      ++stats_.evictions;
    }
    ref_[b] = 1;
    out.push_back(b);
  }
  stats_.allocated_blocks += n;
  return out;
}

template <typename Check>
void BlockAllocator::validate_counts(const std::vector<int64_t>& block_ids, Check check) {
  // Counts each block's occurrences in pending_ and calls check(block,
  // occurrences so far), which throws on a violation. pending_ is left all
  // zero on both paths, so this is O(len(block_ids)).
  size_t i = 0;
  try {
    for (; i < block_ids.size(); ++i) {
      const BlockId b = checked_id(block_ids[i]);
      check(b, ++pending_[b]);
    }
  } catch (...) {
    // Ids [0, i) were counted; id i was counted too if it was in range.
    const size_t counted = i < block_ids.size() && block_ids[i] >= 0 &&
                                   block_ids[i] < num_blocks_
                               ? i + 1
                               : i;
    for (size_t j = 0; j < counted; ++j) pending_[block_ids[j]] = 0;
    throw;
  }
  for (const int64_t id : block_ids) pending_[id] = 0;
}

void BlockAllocator::free(const std::vector<int64_t>& block_ids) {
  validate_counts(block_ids, [this](BlockId b, int32_t times) {
    if (times > ref_[b]) {
      throw std::invalid_argument(
          "free: " + block_str(b) +
          (ref_[b] == 0 ? " is not allocated (ref count 0): double free"
                        : " freed " + std::to_string(times) + " times but its ref count is " +
                              std::to_string(ref_[b])));
    }
  });
  for (const int64_t id : block_ids) {
    const auto b = static_cast<BlockId>(id);
    if (--ref_[b] == 0) push_back(hashed_[b] ? lru_list_ : free_list_, b);
  }
}

void BlockAllocator::fork(const std::vector<int64_t>& block_ids) {
  validate_counts(block_ids, [this](BlockId b, int32_t times) {
    if (ref_[b] == 0) {
      throw std::invalid_argument("fork: " + block_str(b) +
                                  " is not allocated (ref count 0); "
                                  "use acquire_cached for cached blocks");
    }
    if (ref_[b] > std::numeric_limits<int32_t>::max() - times) {
      throw std::overflow_error("fork: " + block_str(b) + " ref count overflow");
    }
  });
  for (const int64_t id : block_ids) ++ref_[id];
}

bool BlockAllocator::cache_block(int64_t block_id, Hash hash) {
  const BlockId b = checked_id(block_id);
  if (ref_[b] == 0) {
    throw std::invalid_argument("cache_block: " + block_str(b) +
                                " is not allocated (ref count 0)");
  }
  if (hashed_[b]) {
    if (hash_[b] == hash) return false;
    throw std::invalid_argument("cache_block: " + block_str(b) + " is already cached under hash " +
                                std::to_string(hash_[b]) + ", not " + std::to_string(hash));
  }
  const auto [it, inserted] = cache_.try_emplace(hash, b);
  if (!inserted) return false;  // another block holds this hash; keep it
  hash_[b] = hash;
  hashed_[b] = 1;
  return true;
}

BlockAllocator::BlockId BlockAllocator::lookup(Hash hash) const {
  const auto it = cache_.find(hash);
  return it == cache_.end() ? kNone : it->second;
}

BlockAllocator::BlockId BlockAllocator::take_ref_on_cached(BlockId b) {
  if (ref_[b] == 0) {
    unlink(lru_list_, b);
  } else if (ref_[b] == std::numeric_limits<int32_t>::max()) {
    throw std::overflow_error("acquire_cached: " + block_str(b) + " ref count overflow");
  }
  ++ref_[b];
  return b;
}

BlockAllocator::BlockId BlockAllocator::acquire_cached(Hash hash) {
  ++stats_.cache_queries;
  const BlockId b = lookup(hash);
  if (b == kNone) return kNone;
  ++stats_.cache_hits;
  return take_ref_on_cached(b);
}

std::vector<BlockAllocator::BlockId> BlockAllocator::get_cached_blocks(
    const std::vector<Hash>& hashes) {
  std::vector<BlockId> out;
  for (const Hash h : hashes) {
    const BlockId b = acquire_cached(h);
    if (b == kNone) break;
    out.push_back(b);
  }
  return out;
}

bool BlockAllocator::reset_prefix_cache() {
  while (lru_list_.size > 0) {
    const BlockId b = pop_front(lru_list_);
    cache_.erase(hash_[b]);
    hashed_[b] = 0;
    hash_[b] = 0;
    push_back(free_list_, b);
  }
  return cache_.empty();
}

int32_t BlockAllocator::ref_count(int64_t block_id) const { return ref_[checked_id(block_id)]; }

std::optional<BlockAllocator::Hash> BlockAllocator::block_hash(int64_t block_id) const {
  const BlockId b = checked_id(block_id);
  if (!hashed_[b]) return std::nullopt;
  return hash_[b];
}

double BlockAllocator::usage() const {
  if (num_blocks_ == 0) return 0.0;
  return static_cast<double>(num_used_blocks()) / static_cast<double>(num_blocks_);
}

std::vector<BlockAllocator::BlockId> BlockAllocator::evictable_blocks() const {
  std::vector<BlockId> out;
  out.reserve(static_cast<size_t>(lru_list_.size));
  for (BlockId b = lru_list_.head; b != kNone; b = next_[b]) out.push_back(b);
  return out;
}

void BlockAllocator::check_invariants() const {
  auto fail = [](const std::string& what) {
    throw std::logic_error("BlockAllocator invariant violated: " + what);
  };
  std::vector<uint8_t> on_list(static_cast<size_t>(num_blocks_), 0);
  auto walk = [&](const List& list, uint8_t tag, bool want_hashed, const char* name) {
    int64_t count = 0;
    BlockId prev = kNone;
    for (BlockId b = list.head; b != kNone; b = next_[b]) {
      if (b < 0 || b >= num_blocks_) fail(std::string(name) + " holds an invalid id");
      if (on_list[b]) fail(block_str(b) + " is on two lists or in a cycle");
      on_list[b] = tag;
      if (prev_[b] != prev) fail(block_str(b) + " has a wrong prev link on " + name);
      if (ref_[b] != 0) fail(block_str(b) + " is on " + name + " with ref count > 0");
      if (static_cast<bool>(hashed_[b]) != want_hashed) {
        fail(block_str(b) + " on " + name + " has the wrong hashed state");
      }
      prev = b;
      if (++count > num_blocks_) fail(std::string(name) + " is longer than num_blocks");
    }
    if (prev != list.tail) fail(std::string(name) + " tail mismatch");
    if (count != list.size) fail(std::string(name) + " size mismatch");
  };
  walk(free_list_, 1, false, "the free list");
  walk(lru_list_, 2, true, "the LRU list");
  int64_t hashed = 0;
  for (BlockId b = 0; b < static_cast<BlockId>(num_blocks_); ++b) {
    if (ref_[b] < 0) fail(block_str(b) + " has a negative ref count");
    if (ref_[b] == 0 && !on_list[b]) fail(block_str(b) + " has ref count 0 but is on no list");
    if (pending_[b] != 0) fail("free() scratch not cleared for " + block_str(b));
    if (hashed_[b]) {
      ++hashed;
      const auto it = cache_.find(hash_[b]);
      if (it == cache_.end() || it->second != b) fail(block_str(b) + " hash not mapped to it");
    }
  }
  if (hashed != static_cast<int64_t>(cache_.size())) fail("cache map size mismatch");
}

}  // namespace pyserve
