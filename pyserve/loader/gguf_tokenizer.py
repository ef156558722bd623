"""A `tokenizers.Tokenizer` built from a GGUF file's `tokenizer.*` metadata, cached on disk.

Building it (gguf_tokenizer_build) avoids transformers' import (~2.6 s) and converter (~6.8 s)
but still costs ~0.2 s, so the first load writes the tokenizer JSON to a cache keyed by the file's
path, size and mtime; later loads are a single `Tokenizer.from_file`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass

from tokenizers import Tokenizer

from pyserve.loader.gguf_reader import GGUFFile, read_gguf
from pyserve.loader.gguf_tokenizer_build import CONVERTER_VERSION, add_bos_eos, build_tokenizer, opt_int
from pyserve.loader.gguf_tokenizer_keys import check_tokenizer_keys

log = logging.getLogger(__name__)


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

    @functools.cached_property
    def max_bytes_per_token(self) -> int:
        """An upper bound on the input bytes one token can cover, so that a text too long for the
        context can be refused before it is tokenized (which holds the GIL for ~0.5 s per MB).
        A vocabulary entry's UTF-8 spelling is never shorter than what it covers (byte-level "Ġ" is
        2 bytes for 1, "▁" 3 for 1, "<0x41>" 6 for 1); a normalizer may shrink the input (NFKC,
        stripping), hence the margin."""
        longest = max((len(t.encode("utf-8")) for t in self.tokenizer.get_vocab(with_added_tokens=True)),
                      default=1)
        return longest * (4 if self.tokenizer.normalizer is not None else 1)


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
        check_tokenizer_keys(meta, f.path)
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
        add_bos, add_eos = add_bos_eos(meta)
        return GGUFTokenizer(
            tokenizer=tok,
            bos_token_id=opt_int(meta, "tokenizer.ggml.bos_token_id"),
            eos_token_id=opt_int(meta, "tokenizer.ggml.eos_token_id"),
            unk_token_id=opt_int(meta, "tokenizer.ggml.unknown_token_id"),
            pad_token_id=opt_int(meta, "tokenizer.ggml.padding_token_id"),
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            chat_template=meta.get("tokenizer.chat_template"),
        )
    finally:
        if f is not gguf:
            f.close()
