"""The GGUF tokenizer against transformers' own GGUF conversion (the reference), and its cache."""

from __future__ import annotations

import os

import pytest

from pyserve.loader.gguf_reader import read_gguf
from pyserve.loader.gguf_tokenizer import build_tokenizer, cache_path, load_tokenizer
from pyserve.loader.gguf_types import GGUFError

TEXTS = [
    "Hello world",
    "Hello, World! How are you?",
    "  leading spaces",
    "trailing spaces   ",
    "a\n\nb\r\n\tc",
    "    \n\n\n   \t\t ",
    "",
    " ",
    "def f(x):\n    return x**2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np\nprint(np.arange(10))",
    "12345 + 678 = 13023",
    " 1 22 333 4444 3.14159",
    "don't won't I'm they'll we've she'd",
    "héllo wörld ça va naïve",
    "日本語のテキストです。",
    "Привет, мир!",
    "مرحبا بالعالم",
    "emoji 😀👍🏽 🇫🇷 👨‍👩‍👧",
    "\u200b zero\u00a0width and nbsp",
    "mixed 中文 and English 123",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "x<|im_end|>y<|im_start|>z",
    "<file_sep><repo_name>pyserve<filename>main.py",
    "<|im_start|> spaced <|im_end|>",
    "<|im_star",
    "a" * 100,
    "The quick brown fox jumps over the lazy dog. " * 5,
    "URL: https://example.com/path?q=1&r=2#frag",
    "email@example.org, @user #hashtag $100 50% ^_^",
    "Tabs\tand\vvertical\fform feeds",
    "\x00\x01 control chars \x7f",
    "ÅÆØ ß ſ ﬁ ligature",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
]


@pytest.fixture(scope="module")
def ours(smollm_path, tmp_path_factory):
    return load_tokenizer(smollm_path, cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def reference(smollm_path):
    """transformers' tokenizer for the same file (~9 s: import plus its converter)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm_path), gguf_file=os.path.basename(smollm_path)
    )


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers(ours, reference, text):
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_special_tokens_match_transformers(ours, reference):
    assert ours.token(ours.bos_token_id) == reference.bos_token == "<|im_start|>"
    assert ours.token(ours.eos_token_id) == reference.eos_token == "<|im_end|>"
    assert ours.token(ours.pad_token_id) == reference.pad_token
    assert ours.token(ours.unk_token_id) == reference.unk_token
    assert ours.chat_template == reference.chat_template
    assert ours.tokenizer.get_vocab_size() == len(reference)


def test_metadata(ours):
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == (1, 2, 0, 2)
    assert not ours.add_bos_token and not ours.add_eos_token
    assert ours.encode("<|im_start|>user") == [1, 4093]
    assert ours.encode("2024") == [34, 32, 34, 36]  # smollm splits digits one by one


def test_cache_written_then_used(smollm_path, tmp_path):
    path = cache_path(smollm_path, str(tmp_path))
    assert not os.path.exists(path)
    first = load_tokenizer(smollm_path, cache_dir=str(tmp_path))
    assert os.path.exists(path)
    assert [p for p in os.listdir(os.path.dirname(path)) if p.startswith(".tmp")] == []  # atomic, no leftovers
    mtime = os.stat(path).st_mtime_ns
    second = load_tokenizer(smollm_path, cache_dir=str(tmp_path))
    assert os.stat(path).st_mtime_ns == mtime
    assert second.encode("héllo <|im_end|> 42") == first.encode("héllo <|im_end|> 42")


def test_corrupt_cache_is_rebuilt(smollm_path, tmp_path):
    path = cache_path(smollm_path, str(tmp_path))
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("{not json")
    tok = load_tokenizer(smollm_path, cache_dir=str(tmp_path))
    assert tok.encode("Hello world") == [19556, 905]
    assert load_tokenizer(smollm_path, cache_dir=str(tmp_path)).encode("Hello world") == [19556, 905]


def test_cache_follows_xdg_cache_home(smollm_path, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_path(smollm_path).startswith(os.path.join(str(tmp_path), "pyserve", ""))


def test_other_tokenizer_models_rejected(smollm_path):
    with read_gguf(smollm_path) as f:
        meta = dict(f.metadata)
    meta["tokenizer.ggml.model"] = "llama"
    with pytest.raises(GGUFError, match="'llama' is not supported yet"):
        build_tokenizer(meta, "x.gguf")
