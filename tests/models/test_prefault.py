"""The KV-cache prefault: it backs the mapping with memory and never changes a byte."""

import mmap

import pytest
import torch

from pyserve.models.prefault import populate, populate_in_background


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_populate_keeps_what_was_written_and_backs_the_rest():
    size = 96 << 20
    buf = mmap.mmap(-1, size)
    t = torch.frombuffer(buf, dtype=torch.uint8)
    t[: 1 << 20] = 7  # the engine got there first for this part
    t[-100:] = 9
    before = rss_bytes()
    supported = populate(buf)
    if not supported:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE: pages fault in on demand")
    assert rss_bytes() - before > 80 << 20, "the mapping was not backed with memory"
    assert (t[: 1 << 20] == 7).all() and (t[-100:] == 9).all()
    assert not t[1 << 20 : -100].any(), "untouched pages must still read as zero"


def test_model_cache_is_populated_in_the_background_and_still_zero():
    buf = mmap.mmap(-1, 8 << 20)
    thread = populate_in_background(buf)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert not torch.frombuffer(buf, dtype=torch.uint8).any()
