"""The GGUF tokenizer against transformers' own GGUF conversion (the reference), and its cache."""

from __future__ import annotations

import os

import pytest

from pyserve.loader.gguf_reader import read_gguf
from pyserve.loader.gguf_tokenizer import cache_path, load_tokenizer
from pyserve.loader.gguf_pretokenizers import SPLITS, word_split
from pyserve.loader.gguf_tokenizer_build import build_tokenizer
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
    meta["tokenizer.ggml.model"] = "bert"
    with pytest.raises(GGUFError, match="x.gguf: tokenizer.ggml.model 'bert' is not supported yet"):
        build_tokenizer(meta, "x.gguf")


def test_unknown_pre_tokenizer_rejected(smollm_path):
    """Splitting text another model's way would give plausible but wrong ids: refuse instead."""
    with read_gguf(smollm_path) as f:
        meta = dict(f.metadata)
    meta["tokenizer.ggml.pre"] = "jais-2"
    with pytest.raises(GGUFError, match="x.gguf: tokenizer.ggml.pre 'jais-2' is not supported"):
        build_tokenizer(meta, "x.gguf")


@pytest.mark.parametrize("pre", sorted(SPLITS, key=str))
def test_every_pre_tokenizer_builds(pre):
    """Most names have no test vectors; at least their regexes must compile and split text."""
    split = word_split(pre, "x.gguf").build()
    pieces = split.pre_tokenize_str("Hello, y'all! 12345 \u00bd  \n\tC\u1eeda Vi\u1ec7t \u6211\u60f3")
    assert len(pieces) > 1


# A small SentencePiece-style ("llama") vocabulary: specials, the 256 byte tokens, then pieces
# with descending scores, so merges have to be derived from the scores.
_PIECES = (
    "▁ e t a o h l n s i r d w c u ! ? , . 1 2 3 H W T é 世 界 ▁t he ▁the ▁a in er ▁w or ll ▁h el lo "
    "ell ello ▁H ▁He ▁Hello ▁wor ld ▁world ▁World ▁W ▁Wor an ▁an nd ▁and 12 ▁1 ▁▁ ▁▁▁▁ <tool>"
).split(" ")
LLAMA_TEXTS = ["Hello world", " Hello  world", "Hello\nWorld 123 é世界!", "", "the and an", "<s>x</s>", "unknown ü ☃", "  ", "x<tool> y<tool>"]


def _write_llama_vocab(path, add_space_prefix: bool | None = None, arch: str = "llama") -> None:
    gguf = pytest.importorskip("gguf")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * (len(_PIECES) - 1) + [4]
    w = gguf.GGUFWriter(str(path), arch=arch)
    for add in (w.add_block_count, w.add_context_length, w.add_embedding_length, w.add_feed_forward_length, w.add_head_count):
        add(8)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(_PIECES))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_llama_vocab_matches_transformers(tmp_path):
    """transformers builds a "llama" vocabulary two ways, by architecture: for phi3 the space in
    front comes from a normalizer, as in llama.cpp and Llama 2's own tokenizer.json (' Hello' ->
    ['▁', '▁Hello']); for llama from Metaspace, which loses a leading space (['▁Hello']).
    llama.cpp's llama-spm test vectors side with the first, so that is the reference here; pyserve
    builds the same tokenizer whatever the architecture."""
    transformers = pytest.importorskip("transformers")
    _write_llama_vocab(tmp_path / "tiny.gguf", arch="phi3")
    _write_llama_vocab(tmp_path / "llama.gguf", arch="llama")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    ours = load_tokenizer(tmp_path / "tiny.gguf", use_cache=False)
    as_llama = load_tokenizer(tmp_path / "llama.gguf", use_cache=False)
    assert ours.add_bos_token and not ours.add_eos_token
    for text in LLAMA_TEXTS:
        assert as_llama.encode(text) == ours.encode(text), text
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text


def test_llama_vocab_without_space_prefix(tmp_path):
    _write_llama_vocab(tmp_path / "tiny.gguf", add_space_prefix=False)
    ours = load_tokenizer(tmp_path / "tiny.gguf", use_cache=False)
    assert ours.tokenizer.encode("Hello", add_special_tokens=False).tokens == ["H", "ello"]
    assert ours.decode(ours.encode(" Hello world", add_special_tokens=False)) == " Hello world"
