"""pyserve's GGUF tokenizers against llama.cpp's vocabulary test vectors.

llama.cpp ships vocabulary-only GGUF files (models/ggml-vocab-NAME.gguf) with inputs chosen to be
hard (leading and repeated spaces, newlines and tabs, digit runs, emoji, Khmer, combining marks)
and the ids the model's own Hugging Face tokenizer gives for them. Each tokenizer is built afresh
(no cache), so these test the converter, not a cache entry an older converter wrote; reading back
what the cache would store is checked separately.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from pyserve.loader.gguf_reader import read_gguf
from pyserve.loader.gguf_tokenizer import load_tokenizer
from pyserve.loader.gguf_types import GGUFError
from tests import llamacpp

# The vocabularies with vectors in the pinned llama.cpp (test_vocab_list_is_current checks this).
WITH_VECTORS = [
    "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2", "llama-bpe",
    "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder",
]
# Vocabularies whose tokenizer model is not implemented: name -> what the error must name.
REFUSED = {"bert-bge": "'bert'", "nomic-bert-moe": "'t5'"}


@pytest.fixture(scope="session")
def models_dir():
    """llama.cpp's models/ folder (downloaded on first use; a failure is an error, not a skip)."""
    return llamacpp.llama_cpp_dir() / "models"


def _vocab(models_dir, name):
    return models_dir / f"ggml-vocab-{name}.gguf"


def test_vocab_list_is_current(models_dir):
    """A vocabulary with vectors that is neither tested nor refused would go unnoticed."""
    with_vectors = {p.name.removeprefix("ggml-vocab-").removesuffix(".gguf") for p in llamacpp.vocab_files()}
    assert with_vectors - set(REFUSED) == set(WITH_VECTORS)
    assert all(_vocab(models_dir, name).exists() for name in REFUSED)


@pytest.mark.parametrize("name", WITH_VECTORS)
def test_ids_match_reference(models_dir, name):
    path = _vocab(models_dir, name)
    tok = load_tokenizer(path, use_cache=False)
    vectors = llamacpp.vocab_vectors(path)
    assert vectors
    wrong = []
    for text, ref in vectors:
        ids = tok.encode(text, add_special_tokens=False)
        if ids != ref:
            wrong.append(f"  {text!r}\n    ours {ids}\n    ref  {ref}")
        # The server streams text out of these ids, so decoding the reference ids must give the input back.
        if tok.decode(ref) != text:
            wrong.append(f"  decode({ref}) = {tok.decode(ref)!r}, not {text!r}")
    assert not wrong, f"{name}: {len(wrong)} mismatches in {len(vectors)} inputs:\n" + "\n".join(wrong)
    # What the on-disk cache stores, read back, must tokenize the same.
    cached = Tokenizer.from_str(tok.tokenizer.to_str())
    wrong = [text for text, ref in vectors if cached.encode(text, add_special_tokens=False).ids != ref]
    assert not wrong, f"{name}: the cached tokenizer differs on {wrong}"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_model_refused(models_dir, name):
    with pytest.raises(GGUFError, match=f"tokenizer.ggml.model {REFUSED[name]} is not supported"):
        load_tokenizer(_vocab(models_dir, name), use_cache=False)


def test_file_without_pre_name(models_dir):
    """ggml-vocab-gpt-neox.gguf predates `tokenizer.ggml.pre`, which is read as GPT-2's split. It
    holds the same vocabulary as mpt's file (GPT-NeoX-20B's), so mpt's vectors apply to it."""
    neox, mpt = _vocab(models_dir, "gpt-neox"), _vocab(models_dir, "mpt")
    with read_gguf(neox) as a, read_gguf(mpt) as b:
        assert "tokenizer.ggml.pre" not in a.metadata
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            assert a.metadata[key] == b.metadata[key], key
    tok = load_tokenizer(neox, use_cache=False)
    vectors = llamacpp.vocab_vectors(mpt)
    wrong = [text for text, ref in vectors if tok.encode(text, add_special_tokens=False) != ref]
    assert not wrong, f"gpt-neox: {len(wrong)} of {len(vectors)} inputs differ: {wrong}"
