"""A `tokenizers.Tokenizer` built from a GGUF file's `tokenizer.*` metadata, cached on disk.

Mirrors what transformers' GGUF path builds for byte-level BPE (`tokenizer.ggml.model == "gpt2"`)
without importing transformers (~2.6 s) or running its converter (~6.8 s). The first load writes
the tokenizer JSON to the cache; later loads are a single `Tokenizer.from_file`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from pyserve.loader.gguf_reader import GGUFFile, read_gguf
from pyserve.loader.gguf_types import GGUFError

log = logging.getLogger(__name__)

# Bump when the built tokenizer changes, so stale cache entries are not picked up.
CONVERTER_VERSION = 1

TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: <|im_start|> and friends
TOKEN_TYPE_USER_DEFINED = 4  # added tokens that are matched whole but are not special

# llama.cpp's pre-tokenizer regexes, keyed by `tokenizer.ggml.pre` (see llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# These split every digit off on its own before the GPT-2 regex (llama.cpp: "\p{N}" first);
# that is what SmolLM2's own tokenizer.json does with `Digits(individual_digits=True)`.
_DIGIT_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level vocabularies are spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@dataclass
class GGUFTokenizer:
    """The tokenizer plus what the server needs besides encode/decode."""

    tokenizer: Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokenizer.id_to_token(token_id)


def _opt_int(meta: Mapping[str, Any], key: str) -> int | None:
    v = meta.get(key)
    return None if v is None else int(v)


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGIT_FIRST:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    split = _SPLITS.get(pre or "")
    if split is not None:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if pre not in (None, "default", "gpt2", "gpt-2"):
        log.warning("GGUF pre-tokenizer %r is not known here; using GPT-2's split", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def build_tokenizer(meta: Mapping[str, Any], path: str = "<gguf>") -> Tokenizer:
    """Build the `Tokenizer` that a GGUF's metadata describes (no cache). Only byte-level BPE."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(
            f"{path}: tokenizer.ggml.model {model!r} is not supported yet (only 'gpt2', byte-level BPE)"
        )
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    if not tokens or not merges:
        raise GGUFError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []

    # A few converters store some tokens as raw text; the BPE model needs them byte-level spelled.
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>) must be matched whole and are special; a "control" token
    # spelled outside the byte alphabet is a converter mislabel and would grow the vocab, so skip.
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == TOKEN_TYPE_CONTROL and set(t) <= alphabet
    ]
    if special:
        tok.add_special_tokens(special)
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)

    bos_id = _opt_int(meta, "tokenizer.ggml.bos_token_id")
    eos_id = _opt_int(meta, "tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:
        bos = tokens[bos_id] if add_bos else ""
        eos = tokens[eos_id] if add_eos else ""
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyserve")


def cache_path(gguf_path: str, cache_dir: str | None = None) -> str:
    """Where the tokenizer of this exact file (path, size, mtime) is cached."""
    st = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return os.path.join(cache_dir or default_cache_dir(), "tokenizers", f"{digest}.json")


def _write_atomic(path: str, text: str) -> None:
    """Write via a temp file and rename, so a concurrent or killed writer never leaves half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load_cached(path: str) -> Tokenizer | None:
    if not os.path.exists(path):
        return None
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # a corrupt entry: rebuild and overwrite it
        log.warning("ignoring unreadable tokenizer cache %s: %s", path, e)
        return None


def load_tokenizer(
    gguf: GGUFFile | str | os.PathLike[str], cache_dir: str | None = None, use_cache: bool = True
) -> GGUFTokenizer:
    """The tokenizer of a GGUF file, from the on-disk cache when this file was seen before."""
    f = gguf if isinstance(gguf, GGUFFile) else read_gguf(gguf)
    try:
        meta = f.metadata
        tok = None
        cached = cache_path(f.path, cache_dir) if use_cache else None
        if cached:
            tok = _load_cached(cached)
        if tok is None:
            tok = build_tokenizer(meta, f.path)
            if cached:
                try:
                    _write_atomic(cached, tok.to_str())
                except OSError as e:  # a read-only home is no reason to fail startup
                    log.warning("cannot cache tokenizer at %s: %s", cached, e)
        bos_id = _opt_int(meta, "tokenizer.ggml.bos_token_id")
        eos_id = _opt_int(meta, "tokenizer.ggml.eos_token_id")
        return GGUFTokenizer(
            tokenizer=tok,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            unk_token_id=_opt_int(meta, "tokenizer.ggml.unknown_token_id"),
            pad_token_id=_opt_int(meta, "tokenizer.ggml.padding_token_id"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None,
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None,
            chat_template=meta.get("tokenizer.chat_template"),
        )
    finally:
        if f is not gguf:
            f.close()
