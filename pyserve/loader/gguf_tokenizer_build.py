"""GGUF `tokenizer.*` metadata -> the `tokenizers.Tokenizer` that gives the model's own ids.

The reference is the model's original Hugging Face tokenizer, as recorded in llama.cpp's vocabulary
test vectors (tests/loader/test_gguf_vocab_vectors.py). Three vocabularies, by `tokenizer.ggml.model`:
  "gpt2"    byte-level BPE (tokens + merges), words cut as `tokenizer.ggml.pre` says (gguf_pretokenizers);
  "llama"   SentencePiece-style BPE (tokens + scores, merges derived from the scores when absent),
            with byte fallback and "▁" for spaces, one put in front of the text;
  "gemma4"  SentencePiece-style BPE with the merges given and no space in front.
Other models raise GGUFError ("not supported yet").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from pyserve.loader.gguf_pretokenizers import word_split
from pyserve.loader.gguf_types import GGUFError

# Bump when what build_tokenizer produces changes, so stale cache entries are not picked up.
CONVERTER_VERSION = 3

TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: <|im_start|>, <s> and friends
TOKEN_TYPE_USER_DEFINED = 4  # added tokens that are matched whole but are not special
SPACE = "▁"  # SentencePiece's visible space


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


def _merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    # Split at the first space after the first character, as llama.cpp does, so that a token
    # that is itself a space (SentencePiece-style vocabularies) stays whole.
    pairs = []
    for m in merges:
        i = m.index(" ", 1)
        pairs.append((m[:i], m[i + 1:]))
    return pairs


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list[str], path: str) -> tuple[Tokenizer, set[str]]:
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise GGUFError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.merges")
    split = word_split(meta.get("tokenizer.ggml.pre"), path)
    # A few converters store some tokens as raw text; the BPE model needs them byte-level spelled.
    # Not user-defined ones: those are matched whole in the raw text (as added tokens) and never
    # come out of a merge, and respelled they can collide with a real token (GPT-NeoX's added
    # "  " is id 50276, its merged "ĠĠ" id 245).
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    types = meta.get("tokenizer.ggml.token_type") or []

    def spelled(i: int, t: str) -> str:
        if set(t) <= alphabet or (i < len(types) and types[i] == TOKEN_TYPE_USER_DEFINED):
            return t
        return "".join(spelling[b] for b in t.encode("utf-8"))

    vocab = {spelled(i, t): i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=_merge_pairs(merges), dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, ignore_merges=split.ignore_merges))
    tok.pre_tokenizer = split.build()
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


def _spm_tokenizer(meta: Mapping[str, Any], tokens: list[str], pairs: list[tuple[str, str]], prefix: bool) -> Tokenizer:
    """BPE over the characters of the text with spaces spelled "▁", bytes for what no token covers."""
    unk = opt_int(meta, "tokenizer.ggml.unknown_token_id")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None,
                        unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None))
    # A normalizer, not a Metaspace pre-tokenizer: llama.cpp (and Llama 2's, Mistral's, Phi-3's
    # tokenizer.json) put a space in front of the text, and of each stretch of text after an
    # added token, before turning spaces into "▁"; so ' Hello' is '▁▁Hello' -> ['▁', '▁Hello'].
    # Metaspace adds no "▁" to text that already starts with one and loses that leading space.
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(decode)
    return tok


def _sentencepiece_bpe(meta: Mapping[str, Any], tokens: list[str], path: str) -> tuple[Tokenizer, None]:
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        pairs = _merge_pairs(merges)
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise GGUFError(f"{path}: a llama tokenizer needs tokenizer.ggml.scores (one per token) or merges")
        pairs = merges_from_scores(tokens, scores)
    # llama.cpp prefixes a space unless the file says not to.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    return _spm_tokenizer(meta, tokens, pairs, prefix), None


def _gemma4_bpe(meta: Mapping[str, Any], tokens: list[str], path: str) -> tuple[Tokenizer, None]:
    # Gemma 4's tokenizer.json: the merges are in the file and no space goes in front. llama.cpp
    # also cuts the text at newlines first; no Gemma 4 token mixes a newline with anything else,
    # so that changes no ids and is left out.
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise GGUFError(f"{path}: a gemma4 tokenizer needs tokenizer.ggml.merges")
    return _spm_tokenizer(meta, tokens, _merge_pairs(merges), prefix=False), None


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe, "gemma4": _gemma4_bpe}
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
