"""Fixtures for the GGUF loader tests: the real SmolLM2 file and gguf-py's reading of it."""

from __future__ import annotations

import os

# The transformers reference must never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from pyserve.loader.gguf_types import GGUFError
from pyserve.loader.gguf_weights import default_gguf_path


@pytest.fixture(scope="session")
def smollm_path() -> str:
    try:
        return default_gguf_path()
    except GGUFError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def gguf_py_reader(smollm_path):
    """gguf-py's own reader of the real file (~4 s), shared by the reader and dequant tests."""
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(smollm_path)
