"""Tests for pyserve._C.BlockAllocator: unit tests per behaviour, then a seeded
randomized comparison against a plain Python model of the allocator."""

import random
from collections import Counter, OrderedDict

import pytest

import pyserve._ops  # noqa: F401  (imports torch, then pyserve._C)
from pyserve._C import BlockAllocator

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def snapshot(a: BlockAllocator):
    """Everything observable about an allocator, for 'state unchanged' checks."""
    return (
        [a.ref_count(b) for b in range(a.num_blocks)],
        [a.block_hash(b) for b in range(a.num_blocks)],
        a.num_free_blocks,
        a.num_evictable_blocks,
        a.num_cached_blocks,
        a.evictable_blocks(),
    )


# ---------------------------------------------------------------- basics


def test_initial_state():
    a = BlockAllocator(8)
    assert a.num_blocks == 8 == len(a)
    assert a.num_free_blocks == 8
    assert a.num_evictable_blocks == 0
    assert a.num_cached_blocks == 0
    assert a.num_used_blocks == 0
    assert a.usage() == 0.0
    assert all(a.ref_count(b) == 0 and a.block_hash(b) is None for b in range(8))
    assert "num_blocks=8" in repr(a)
    a.check_invariants()


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BlockAllocator(-1)
    with pytest.raises(ValueError):
        BlockAllocator(2**31)
    a = BlockAllocator(0)
    assert a.allocate(0) == []
    assert a.allocate(1) is None
    assert a.usage() == 0.0


def test_allocate_fifo_and_refcount():
    a = BlockAllocator(6)
    assert a.allocate(0) == []
    assert a.allocate(2) == [0, 1]
    assert a.allocate(3) == [2, 3, 4]
    assert all(a.ref_count(b) == 1 for b in range(5))
    assert a.num_free_blocks == 1
    assert a.usage() == pytest.approx(5 / 6)
    a.free([3, 1])
    # Freed uncached blocks go to the free-list tail.
    assert a.allocate(3) == [5, 3, 1]
    with pytest.raises(ValueError):
        a.allocate(-1)


def test_exhaustion_returns_none_and_leaves_state_intact():
    a = BlockAllocator(4)
    blocks = a.allocate(3)
    a.cache_block(blocks[0], 11)
    a.free([blocks[0]])  # evictable
    before = snapshot(a)
    assert a.allocate(3) is None
    assert snapshot(a) == before
    assert a.stats()["failed_allocations"] == 1
    assert a.stats()["evictions"] == 0
    assert a.allocate(2) == [3, 0]  # free block first, then the evictable one
    assert a.stats()["evictions"] == 1
    assert a.block_hash(0) is None and a.lookup(11) == -1
    a.check_invariants()


# ---------------------------------------------------------------- free / fork


def test_double_free_raises_and_leaves_state_intact():
    a = BlockAllocator(4)
    x = a.allocate(2)
    a.free([x[0]])
    before = snapshot(a)
    with pytest.raises(ValueError, match=rf"block {x[0]}\b.*double free"):
        a.free([x[1], x[0]])  # valid id first: must not be freed either
    assert snapshot(a) == before
    assert a.ref_count(x[1]) == 1
    a.check_invariants()


def test_free_more_times_than_refcount_raises_without_mutation():
    a = BlockAllocator(4)
    (b,) = a.allocate(1)
    a.fork([b])  # ref 2
    before = snapshot(a)
    with pytest.raises(ValueError, match=rf"block {b}\b"):
        a.free([b, b, b])
    assert snapshot(a) == before
    a.free([b, b])  # exactly its ref count is fine
    assert a.ref_count(b) == 0
    assert a.num_free_blocks == 4
    a.check_invariants()


def test_out_of_range_ids_raise_index_error_naming_the_id():
    a = BlockAllocator(4)
    x = a.allocate(2)
    before = snapshot(a)
    for bad in (4, -1, 2**40):
        with pytest.raises(IndexError, match=str(bad)):
            a.free([x[0], bad])
        with pytest.raises(IndexError, match=str(bad)):
            a.fork([x[0], bad])
        with pytest.raises(IndexError, match=str(bad)):
            a.ref_count(bad)
        with pytest.raises(IndexError, match=str(bad)):
            a.block_hash(bad)
        with pytest.raises(IndexError, match=str(bad)):
            a.cache_block(bad, 1)
    assert snapshot(a) == before
    a.check_invariants()


def test_fork_and_free_refcounting():
    a = BlockAllocator(4)
    x = a.allocate(2)
    a.fork(x)
    a.fork([x[0]])
    assert [a.ref_count(b) for b in x] == [3, 2]
    a.free(x)
    assert [a.ref_count(b) for b in x] == [2, 1]
    assert a.num_free_blocks == 2
    a.free(x)
    assert [a.ref_count(b) for b in x] == [1, 0]
    assert a.num_free_blocks == 3
    a.free([x[0]])
    assert a.num_free_blocks == 4 and a.usage() == 0.0
    a.check_invariants()


def test_fork_of_free_or_evictable_block_raises_without_mutation():
    a = BlockAllocator(4)
    x = a.allocate(2)
    a.cache_block(x[1], 5)
    a.free([x[1]])  # evictable
    before = snapshot(a)
    with pytest.raises(ValueError, match="block 3"):
        a.fork([x[0], 3])
    with pytest.raises(ValueError, match=f"block {x[1]}"):
        a.fork([x[0], x[1]])
    assert snapshot(a) == before
    a.check_invariants()


# ---------------------------------------------------------------- prefix cache


def test_cache_lookup_acquire():
    a = BlockAllocator(4)
    x = a.allocate(2)
    assert a.cache_block(x[0], 100) is True
    assert a.cache_block(x[0], 100) is False  # already cached under it
    assert a.block_hash(x[0]) == 100 and a.block_hash(x[1]) is None
    assert a.num_cached_blocks == 1
    assert a.lookup(100) == x[0] and a.lookup(200) == -1
    assert a.ref_count(x[0]) == 1  # lookup touches nothing
    assert a.acquire_cached(100) == x[0]
    assert a.ref_count(x[0]) == 2
    assert a.acquire_cached(200) == -1
    a.free([x[0], x[0]])
    assert a.num_evictable_blocks == 1 and a.evictable_blocks() == [x[0]]
    assert a.num_free_blocks == 3  # 2 free + 1 evictable
    # Acquiring an evictable block revives it and takes it off the LRU list.
    assert a.acquire_cached(100) == x[0]
    assert a.ref_count(x[0]) == 1 and a.num_evictable_blocks == 0
    assert a.num_free_blocks == 2
    assert a.stats()["cache_queries"] == 3 and a.stats()["cache_hits"] == 2
    a.check_invariants()


def test_cache_block_errors_and_duplicate_hash():
    a = BlockAllocator(4)
    x = a.allocate(2)
    with pytest.raises(ValueError, match="block 3"):
        a.cache_block(3, 1)  # free block
    assert a.cache_block(x[0], 7)
    with pytest.raises(ValueError, match=f"block {x[0]}"):
        a.cache_block(x[0], 8)  # already cached under another hash
    # Same hash on another block: the existing mapping wins.
    assert a.cache_block(x[1], 7) is False
    assert a.lookup(7) == x[0] and a.block_hash(x[1]) is None
    assert a.num_cached_blocks == 1
    a.free(x)
    assert a.num_evictable_blocks == 1 and a.num_free_blocks == 4
    a.check_invariants()


def test_hash_range_is_int64():
    a = BlockAllocator(4)
    x = a.allocate(3)
    assert a.cache_block(x[0], INT64_MIN)
    assert a.cache_block(x[1], INT64_MAX)
    assert a.cache_block(x[2], hash((INT64_MAX, (1, 2, 3))))
    assert a.lookup(INT64_MIN) == x[0] and a.block_hash(x[1]) == INT64_MAX
    for bad in (2**63, INT64_MIN - 1, 2**64 - 1):
        with pytest.raises(OverflowError):
            a.lookup(bad)
        with pytest.raises(OverflowError):
            a.acquire_cached(bad)
        with pytest.raises(OverflowError):
            a.get_cached_blocks([INT64_MAX, bad])
    with pytest.raises(TypeError):
        a.lookup("abc")
    with pytest.raises(TypeError):
        a.lookup(1.5)
    # A get_cached_blocks argument error takes no refs.
    assert a.ref_count(x[1]) == 1
    a.check_invariants()


def test_lru_eviction_order():
    a = BlockAllocator(6)
    seq = a.allocate(4)  # [0, 1, 2, 3]
    for i, b in enumerate(seq):
        a.cache_block(b, 1000 + i)
    # vLLM frees a sequence in reverse so its tail blocks are evicted first.
    a.free(list(reversed(seq)))
    assert a.evictable_blocks() == [3, 2, 1, 0]
    assert a.num_free_blocks == 6
    # Never-cached free blocks go first, then LRU order.
    assert a.allocate(3) == [4, 5, 3]
    assert a.lookup(1003) == -1 and a.lookup(1002) == 2
    # Touching a block (acquire + free) moves it to the LRU tail.
    assert a.acquire_cached(1002) == 2
    a.free([2])
    assert a.evictable_blocks() == [1, 0, 2]
    assert a.allocate(2) == [1, 0]
    assert a.lookup(1000) == -1 and a.lookup(1001) == -1 and a.lookup(1002) == 2
    assert a.stats()["evictions"] == 3
    assert a.num_cached_blocks == 1
    a.check_invariants()


def test_get_cached_blocks_longest_prefix():
    a = BlockAllocator(8)
    seq = a.allocate(4)
    hashes = [11, 12, 13, 14]
    for b, h in zip(seq, hashes):
        a.cache_block(b, h)
    a.free(list(reversed(seq)))
    # Miss in the middle: only the prefix before it is returned and acquired.
    assert a.get_cached_blocks([11, 12, 99, 14]) == seq[:2]
    assert [a.ref_count(b) for b in seq] == [1, 1, 0, 0]
    assert a.evictable_blocks() == [seq[3], seq[2]]
    assert a.get_cached_blocks(hashes) == seq
    assert [a.ref_count(b) for b in seq] == [2, 2, 1, 1]
    assert a.get_cached_blocks([]) == []
    assert a.get_cached_blocks(iter([99, 11])) == []
    a.free(seq + seq[:2])
    assert a.num_free_blocks == 8
    a.check_invariants()


def test_reset_prefix_cache():
    a = BlockAllocator(6)
    x = a.allocate(4)
    for i, b in enumerate(x):
        a.cache_block(b, i)
    a.free([x[2], x[0]])  # evictable, in this LRU order
    assert a.reset_prefix_cache() is False  # x[1], x[3] are in use and keep their hashes
    assert a.num_cached_blocks == 2
    assert a.block_hash(x[0]) is None and a.block_hash(x[2]) is None
    assert a.block_hash(x[1]) == 1 and a.lookup(3) == x[3]
    assert a.num_evictable_blocks == 0 and a.num_free_blocks == 4
    # The dropped blocks went to the free-list tail, in LRU order.
    assert a.allocate(4) == [4, 5, x[2], x[0]]
    a.free([4, 5, x[2], x[0], x[1], x[3]])
    assert a.num_evictable_blocks == 2
    assert a.reset_prefix_cache() is True
    assert a.num_cached_blocks == 0 and a.num_free_blocks == 6
    assert a.reset_prefix_cache() is True
    assert a.stats()["evictions"] == 0
    a.check_invariants()


def test_stats_and_reset():
    a = BlockAllocator(3)
    a.allocate(2)
    assert a.allocate(2) is None
    s = a.stats()
    assert s["allocated_blocks"] == 2 and s["failed_allocations"] == 1
    a.reset_stats()
    assert set(a.stats().values()) == {0}


def test_docstrings():
    for name in ("allocate", "free", "fork", "cache_block", "lookup", "acquire_cached",
                 "get_cached_blocks", "reset_prefix_cache", "ref_count", "block_hash", "usage"):
        assert len(getattr(BlockAllocator, name).__doc__) > 60, name
    assert "LRU" in BlockAllocator.__doc__


# ---------------------------------------------------------------- randomized model check


class ModelAllocator:
    """Plain-Python reference implementation of the documented semantics."""

    def __init__(self, n):
        self.n = n
        self.ref = [0] * n
        self.hash = [None] * n
        self.free_list = list(range(n))  # FIFO: pop from the front
        self.lru = OrderedDict()  # front = evicted next
        self.cache = {}
        self.evictions = 0

    def num_free(self):
        return len(self.free_list) + len(self.lru)

    def allocate(self, k):
        if k > self.num_free():
            return None
        out = []
        for _ in range(k):
            if self.free_list:
                b = self.free_list.pop(0)
            else:
                b, _ = self.lru.popitem(last=False)
                del self.cache[self.hash[b]]
                self.hash[b] = None
                self.evictions += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def check_ids(self, ids):
        for b in ids:
            if not 0 <= b < self.n:
                raise IndexError(b)

    def free(self, ids):
        self.check_ids(ids)
        for b, times in Counter(ids).items():
            if times > self.ref[b]:
                raise ValueError(b)
        for b in ids:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.hash[b] is None:
                    self.free_list.append(b)
                else:
                    self.lru[b] = None

    def fork(self, ids):
        self.check_ids(ids)
        for b in ids:
            if self.ref[b] == 0:
                raise ValueError(b)
        for b in ids:
            self.ref[b] += 1

    def cache_block(self, b, h):
        self.check_ids([b])
        if self.ref[b] == 0:
            raise ValueError(b)
        if self.hash[b] is not None:
            if self.hash[b] == h:
                return False
            raise ValueError(b)
        if h in self.cache:
            return False
        self.cache[h] = b
        self.hash[b] = h
        return True

    def lookup(self, h):
        return self.cache.get(h, -1)

    def acquire_cached(self, h):
        b = self.cache.get(h, -1)
        if b >= 0:
            if self.ref[b] == 0:
                del self.lru[b]
            self.ref[b] += 1
        return b

    def get_cached_blocks(self, hs):
        out = []
        for h in hs:
            b = self.acquire_cached(h)
            if b < 0:
                break
            out.append(b)
        return out

    def reset_prefix_cache(self):
        for b in self.lru:
            del self.cache[self.hash[b]]
            self.hash[b] = None
            self.free_list.append(b)
        self.lru.clear()
        return not self.cache


def assert_same(a: BlockAllocator, m: ModelAllocator):
    assert [a.ref_count(b) for b in range(m.n)] == m.ref
    assert [a.block_hash(b) for b in range(m.n)] == m.hash
    assert a.num_free_blocks == m.num_free()
    assert a.num_evictable_blocks == len(m.lru)
    assert a.evictable_blocks() == list(m.lru)
    assert a.num_cached_blocks == len(m.cache)
    assert a.usage() == pytest.approx((m.n - m.num_free()) / m.n)


def run_random(seed, num_ops, num_blocks=48):
    rng = random.Random(seed)
    a, m = BlockAllocator(num_blocks), ModelAllocator(num_blocks)
    held = []  # one entry per reference this test owns
    # A small hash space (plus the int64 extremes) so collisions and hits are common.
    hash_space = list(range(-20, 40)) + [INT64_MIN, INT64_MAX]

    RAISED = object()

    def both(op, *args):
        """Run op on both; they must agree on the result or on the exception type."""
        try:
            expected = getattr(m, op)(*args)
        except (ValueError, IndexError) as e:
            before = snapshot(a)
            with pytest.raises(type(e)):
                getattr(a, op)(*args)
            assert snapshot(a) == before, f"{op}{args} mutated state before raising"
            return RAISED
        got = getattr(a, op)(*args)
        assert got == expected, (op, args)
        return got

    ops = ["allocate"] * 6 + ["free"] * 6 + ["fork"] * 2 + ["cache"] * 5 + ["lookup"] * 2 + \
          ["acquire"] * 3 + ["prefix"] * 3 + ["bad_free"] + ["bad_fork"] + ["reset"] + ["bad_id"]
    for _ in range(num_ops):
        op = rng.choice(ops)
        if op == "allocate":
            got = both("allocate", rng.randint(0, 10))
            assert got is not RAISED
            if got:
                held.extend(got)
        elif op == "free" and held:
            rng.shuffle(held)
            k = rng.randint(1, min(len(held), 8))
            ids, held[:] = held[:k], held[k:]
            both("free", ids)
        elif op == "fork" and held:
            ids = rng.choices(held, k=rng.randint(1, 4))
            both("fork", ids)
            held.extend(ids)
        elif op == "cache" and held:
            both("cache_block", rng.choice(held), rng.choice(hash_space))
        elif op == "lookup":
            both("lookup", rng.choice(hash_space))
        elif op == "acquire":
            b = both("acquire_cached", rng.choice(hash_space))
            assert b is not RAISED
            if b >= 0:
                held.append(b)
        elif op == "prefix":
            hs = [rng.choice(hash_space) for _ in range(rng.randint(0, 6))]
            held.extend(both("get_cached_blocks", hs))
        elif op == "bad_free":
            # Some valid refs plus one too many: either a ref-0 block or an over-free.
            ids = rng.sample(held, min(len(held), 3))
            b = rng.randrange(num_blocks)
            ids += [b] * (m.ref[b] - Counter(ids)[b] + 1)
            rng.shuffle(ids)
            assert both("free", ids) is RAISED
        elif op == "bad_fork":
            zero = [b for b in range(num_blocks) if m.ref[b] == 0]
            if zero:
                ids = rng.sample(held, min(len(held), 2)) + [rng.choice(zero)]
                rng.shuffle(ids)
                assert both("fork", ids) is RAISED
        elif op == "reset":
            if rng.random() < 0.3:
                both("reset_prefix_cache")
        elif op == "bad_id":
            bad = rng.choice([-1, num_blocks, num_blocks + 7, -(2**40)])
            which = rng.choice(["free", "fork", "cache_block"])
            args = ([bad],) if which != "cache_block" else (bad, 0)
            assert both(which, *args) is RAISED
        assert_same(a, m)
        if rng.random() < 0.05:
            a.check_invariants()

    stats = a.stats()
    assert stats["evictions"] == m.evictions
    # The run must have exercised the interesting paths.
    assert stats["evictions"] > 0 and stats["failed_allocations"] > 0 and stats["cache_hits"] > 0
    # No leaks: dropping every reference we own returns every block.
    a.free(held)
    m.free(held)
    assert_same(a, m)
    assert a.num_free_blocks == num_blocks
    assert a.num_used_blocks == 0 and a.usage() == 0.0
    a.check_invariants()
    assert a.reset_prefix_cache() is True
    assert a.num_cached_blocks == 0 and a.num_evictable_blocks == 0
    assert a.allocate(num_blocks) is not None


@pytest.mark.parametrize("seed", range(5))
def test_randomized_against_model(seed):
    run_random(seed, num_ops=5000)
