"""GGUF `tokenizer.*` metadata -> `tokenizers.Tokenizer`, the way transformers' GGUF path builds it.

Two vocabularies are supported, by `tokenizer.ggml.model`:
  "gpt2"  byte-level BPE (tokens + merges), split by the `tokenizer.ggml.pre` regex;
  "llama" SentencePiece-style BPE (tokens + scores, merges derived from the scores when absent),
          with byte fallback and the "▁" word-boundary marker.
Other models raise GGUFError ("not supported yet").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from pyserve.loader.gguf_types import GGUFError

log = logging.getLogger(__name__)

# Bump when what build_tokenizer produces changes, so stale cache entries are not picked up.
CONVERTER_VERSION = 2

TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: <|im_start|>, <s> and friends
TOKEN_TYPE_USER_DEFINED = 4  # added tokens that are matched whole but are not special

# llama.cpp's pre-tokenizer regexes, keyed by `tokenizer.ggml.pre` (see llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
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
# These split off every digit on its own, then apply GPT-2's regex (llama.cpp: "\p{N}" first).
# It is what SmolLM2's own tokenizer.json does with `Digits(individual_digits=True)`; transformers'
# GGUF path uses plain GPT-2 splitting for "smollm", which gives the same ids only because the
# SmolLM2 vocabulary has no multi-digit or space-digit tokens.
_DIGIT_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}


def opt_int(meta: Mapping[str, Any], key: str) -> int | None:
    v = meta.get(key)
    return None if v is None else int(v)


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


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
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


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list[str], path: str) -> tuple[Tokenizer, set[str]]:
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise GGUFError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.merges")
    # A few converters store some tokens as raw text; the BPE model needs them byte-level spelled.
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    return tok, alphabet


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best score first (transformers' `generate_merges`, reproduced so the order matches)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece_bpe(meta: Mapping[str, Any], tokens: list[str], path: str) -> tuple[Tokenizer, None]:
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise GGUFError(f"{path}: a llama tokenizer needs tokenizer.ggml.scores (one per token) or merges")
        pairs = merges_from_scores(tokens, scores)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    # llama.cpp prefixes a space unless the file says not to; transformers always does, so the two
    # differ only on files with add_space_prefix = false, where we follow llama.cpp.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok, None


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
_ADD_BOS_DEFAULT = {"llama": True}  # llama.cpp adds BOS to SentencePiece vocabularies that do not say


def add_bos_eos(meta: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether encoding prepends BOS / appends EOS (only when that token id exists)."""
    model = meta.get("tokenizer.ggml.model")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", _ADD_BOS_DEFAULT.get(model, False)))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    return (
        add_bos and opt_int(meta, "tokenizer.ggml.bos_token_id") is not None,
        add_eos and opt_int(meta, "tokenizer.ggml.eos_token_id") is not None,
    )


def _add_special_tokens(tok: Tokenizer, meta: Mapping[str, Any], tokens: list[str], alphabet: set[str] | None) -> None:
    """Control tokens and the bos/eos/unk/pad tokens are matched whole in text and are special;
    user-defined tokens are matched whole but are not. In a byte-level vocabulary a "control"
    token spelled outside the byte alphabet is a converter mislabel (adding it would grow the
    vocabulary past the model's), so it is skipped, as transformers does."""
    types = meta.get("tokenizer.ggml.token_type") or []
    ids = {i for i, ty in enumerate(types) if ty == TOKEN_TYPE_CONTROL}
    for key in ("bos", "eos", "unknown", "padding"):
        i = opt_int(meta, f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            ids.add(i)
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i in sorted(ids)
        if alphabet is None or set(tokens[i]) <= alphabet
    ]
    if special:
        tok.add_special_tokens(special)
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == TOKEN_TYPE_USER_DEFINED and tok.token_to_id(t) is not None  # never grow the vocab
    ]
    if user:
        tok.add_tokens(user)


def _post_processor(meta: Mapping[str, Any], tokens: list[str]) -> processors.PostProcessor:
    add_bos, add_eos = add_bos_eos(meta)
    if not (add_bos or add_eos):
        if meta.get("tokenizer.ggml.model") == "gpt2":
            return processors.ByteLevel(trim_offsets=False)
        return processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    bos = tokens[int(meta["tokenizer.ggml.bos_token_id"])] if add_bos else ""
    eos = tokens[int(meta["tokenizer.ggml.eos_token_id"])] if add_eos else ""
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    specials = ([(bos, int(meta["tokenizer.ggml.bos_token_id"]))] if add_bos else []) + (
        [(eos, int(meta["tokenizer.ggml.eos_token_id"]))] if add_eos else []
    )
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def build_tokenizer(meta: Mapping[str, Any], path: str = "<gguf>") -> Tokenizer:
    """Build the `Tokenizer` a GGUF's metadata describes (no caching; ~0.2 s for 49k tokens)."""
    model = meta.get("tokenizer.ggml.model")
    builder = _BUILDERS.get(model)
    if builder is None:
        raise GGUFError(f"{path}: tokenizer.ggml.model {model!r} is not supported yet (supported: {', '.join(_BUILDERS)})")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise GGUFError(f"{path}: no tokenizer.ggml.tokens")
    tok, alphabet = builder(meta, tokens, path)
    _add_special_tokens(tok, meta, tokens, alphabet)
    tok.post_processor = _post_processor(meta, tokens)
    return tok
