"""KV blocks for sequences, on top of the C++ allocator: growing a sequence's
block table, prefix caching by chained block hashes, forking the prompt of
n > 1 samples (copy-on-write of the last partial block), freeing."""

from __future__ import annotations

from pyserve._ops import _C
from pyserve.engine.sequence import Sequence


def block_hash(parent: int | None, tokens: list[int]) -> int:
    # Chained: a block's hash covers every token before it, so equal hashes
    # mean equal prefixes. Python's tuple hash of ints is deterministic and
    # fits the allocator's int64 keys.
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.allocator = _C.BlockAllocator(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) for the next step's copy_blocks
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, found in the cache

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    def usage(self) -> float:
        return self.allocator.usage()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes_upto(self, seq: Sequence, num_blocks: int) -> list[int]:
        while len(seq.block_hashes) < num_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(block_hash(parent, seq.tokens(i * self.block_size, (i + 1) * self.block_size)))
        return seq.block_hashes[:num_blocks]

    def admit(self, seq: Sequence) -> None:
        """On (re)admission: reuse the longest cached prefix of full blocks,
        leaving at least one token to compute so the step yields logits."""
        seq.admitted = True
        if seq.fork_from is not None:
            self._fork(seq.fork_from, seq)
            return
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:  # cached positions would have no logits
            return
        lookup = (seq.num_tokens - 1) // self.block_size
        self.prefix_queries += seq.num_tokens
        if lookup == 0:
            return
        blocks = self.allocator.get_cached_blocks(self._hashes_upto(seq, lookup))
        seq.block_ids = list(blocks)
        seq.num_computed = len(blocks) * self.block_size
        seq.num_cached_blocks = len(blocks)
        seq.prefix_hit_tokens = seq.num_computed
        self.prefix_hits += seq.num_computed

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        # The child recomputes only the prompt's last token (for its own
        # logits): it shares the parent's full blocks before that token and
        # gets a private copy of the partial block holding the rest.
        shared = len(child.prompt_ids) - 1
        full = shared // self.block_size
        self.allocator.fork(parent.block_ids[:full])
        child.block_ids = parent.block_ids[:full]
        child.block_hashes = list(parent.block_hashes[:full])
        child.num_cached_blocks = min(full, parent.num_cached_blocks)
        child.num_computed = full * self.block_size
        if shared % self.block_size:
            copy = self.allocator.allocate(1)
            if copy is None:  # out of blocks: fall back to recomputing that block
                return
            self.pending_copies.append((parent.block_ids[full], copy[0]))
            child.block_ids.append(copy[0])
            child.num_computed = shared

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold num_new_tokens more; False if the
        allocator is out of blocks (nothing changes then)."""
        need = self.blocks_needed(seq.num_computed + num_new_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        blocks = self.allocator.allocate(need)
        if blocks is None:
            return False
        seq.block_ids.extend(blocks)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register blocks that became full (and computed) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_cached_blocks:
            return
        hashes = self._hashes_upto(seq, full)
        for i in range(seq.num_cached_blocks, full):
            self.allocator.cache_block(seq.block_ids[i], hashes[i])
        seq.num_cached_blocks = full

    def free(self, seq: Sequence) -> None:
        # Tail first: the LRU then evicts a sequence's last blocks before its
        # shared prefix.
        if seq.block_ids:
            self.allocator.free(seq.block_ids[::-1])
        seq.block_ids = []
        seq.num_computed = 0
        seq.num_cached_blocks = 0
        seq.admitted = False

    def release(self, seq: Sequence) -> None:
        """Undo an admission that could not be scheduled: free its blocks, and drop the copy a fork queued
        into one of them."""
        if seq.block_ids:
            mine = set(seq.block_ids)
            self.pending_copies = [(src, dst) for src, dst in self.pending_copies if dst not in mine]
        self.free(seq)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
