import pytest

from pyserve.llm import LLM


def make_llm(**kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 0.25)
    return LLM(None, **kwargs)


@pytest.fixture(scope="session")
def llm() -> LLM:
    """The default model with default scheduling; shared, so tests must leave it idle."""
    return make_llm()


def assert_no_leak(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished()
    alloc = engine.block_manager.allocator
    assert alloc.num_free_blocks == alloc.num_blocks, "KV blocks leaked"
    alloc.check_invariants()
