"""Each token id's output bytes, the form a grammar engine matches tokens in.

A `tokenizers.Tokenizer` spells its vocabulary in one of two ways, and pyserve builds both (from a
GGUF file or an HF folder):
  byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): every byte is one printable character
      ("Ġ" is a space), undone by GPT-2's byte -> character table;
  SentencePiece-style (Llama 2, Mistral, Gemma, Phi-3): "▁" is a space, and with byte fallback
      "<0x41>" is the single byte 0x41 (which may be part of a multi-byte UTF-8 character).
Added tokens are matched whole in text: a special one (<|im_end|>, </s>) is a control token, never
text; a non-special one stands for its literal content.

Decoding each id alone would be wrong for both: a byte-level token holding half a UTF-8 character
decodes to U+FFFD, and a SentencePiece decoder strips the space of a leading "▁".
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer, normalizers, pre_tokenizers

from pyserve.loader.gguf_tokenizer_build import bytes_to_unicode

log = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class TokenVocab:
    tokens: list[bytes]  # one per id in [0, vocab_size); b"" for an id the tokenizer does not have
    special_ids: frozenset[int]  # control tokens: never text, allowed only as EOS
    kind: str  # "byte_level" | "sentencepiece" | "raw"


def _state(component: Any) -> Any:
    if component is None:
        return None
    try:
        return json.loads(component.__getstate__())
    except Exception:  # a component that cannot say what it is: treat as unknown
        return None


def _find(state: Any, type_name: str) -> dict | None:
    """The first component of that type in a (possibly nested Sequence) serialized component."""
    if isinstance(state, dict):
        if state.get("type") == type_name:
            return state
        for v in state.values():
            found = _find(v, type_name)
            if found is not None:
                return found
    elif isinstance(state, list):
        for v in state:
            found = _find(v, type_name)
            if found is not None:
                return found
    return None


def _space_symbol(decoder: Any) -> str | None:
    """The character the decoder turns into a space ("▁"), or None."""
    meta = _find(decoder, "Metaspace")
    if meta is not None:
        return meta.get("replacement", "▁")
    rep = _find(decoder, "Replace")
    if rep is not None and rep.get("content") == " ":
        pattern = rep.get("pattern", {})
        if isinstance(pattern, dict) and isinstance(pattern.get("String"), str):
            return pattern["String"]
    return None


def token_bytes(tokenizer: Tokenizer, vocab_size: int, extra_special_ids: tuple[int, ...] = ()) -> TokenVocab:
    """The bytes of every id below `vocab_size` (the model's vocabulary size, which may be larger or
    smaller than the tokenizer's). Ids the tokenizer lacks get b"" and are marked special, so a
    grammar never allows them. `extra_special_ids` (the EOS ids) are marked special too."""
    decoder = _state(tokenizer.decoder)
    byte_level = _find(decoder, "ByteLevel") is not None or (
        decoder is None and _find(_state(tokenizer.pre_tokenizer), "ByteLevel") is not None
    )
    space = None if byte_level else _space_symbol(decoder)
    byte_fallback = _find(decoder, "ByteFallback") is not None or bool(getattr(tokenizer.model, "byte_fallback", False))
    kind = "byte_level" if byte_level else "sentencepiece" if (space or byte_fallback) else "raw"
    # Byte-level spelling -> Latin-1 characters (one per byte), so str.translate + encode("latin-1")
    # undoes it in C; a character left outside Latin-1 means the token is not byte-level spelled.
    unbyte = str.maketrans({c: chr(b) for b, c in bytes_to_unicode().items()})
    added = tokenizer.get_added_tokens_decoder()

    tokens: list[bytes] = [b""] * vocab_size
    special: set[int] = {i for i in extra_special_ids if 0 <= i < vocab_size}
    present = [False] * vocab_size
    for s, i in tokenizer.get_vocab(with_added_tokens=False).items():
        if not 0 <= i < vocab_size or i in added:
            continue
        present[i] = True
        if byte_level:
            try:
                tokens[i] = s.translate(unbyte).encode("latin-1")
                continue
            except UnicodeEncodeError:  # a token a converter stored as raw text
                pass
        elif byte_fallback and len(s) == 6 and (m := _BYTE_TOKEN.fullmatch(s)):
            tokens[i] = bytes([int(m.group(1), 16)])
            continue
        tokens[i] = (s.replace(space, " ") if space else s).encode("utf-8")
    for i, a in added.items():
        if 0 <= i < vocab_size:
            present[i] = True
            tokens[i] = a.content.encode("utf-8")
            if a.special:
                special.add(i)
    special.update(i for i in range(vocab_size) if not present[i])
    return TokenVocab(tokens=tokens, special_ids=frozenset(special), kind=kind)


def _drop_prefix_space(node: object) -> object:
    """A tokenizer.json component with its space-in-front steps turned off."""
    if isinstance(node, dict):
        if node.get("type") == "Prepend":
            return None
        out = {k: _drop_prefix_space(v) for k, v in node.items()}
        if out.get("type") == "Sequence":
            for key in ("normalizers", "pretokenizers"):
                if isinstance(out.get(key), list):
                    out[key] = [x for x in out[key] if x is not None]
        if out.get("type") == "Metaspace":
            out["prepend_scheme"] = "never"
            out.pop("add_prefix_space", None)
        if out.get("type") == "ByteLevel" and "add_prefix_space" in out:
            out["add_prefix_space"] = False
        return out
    if isinstance(node, list):
        return [_drop_prefix_space(x) for x in node]
    return node


def _component(empty: Any, state: Any) -> Any:
    empty.__setstate__(json.dumps(state).encode())
    return empty


def plain_encoder(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer, or a light copy of it, that spells text as is: "{" as "{", not "▁{"
    (SentencePiece vocabularies put a space in front of the text). The copy shares the model
    (copying a whole 128k-token BPE through JSON takes seconds)."""
    norm, pre = _state(tokenizer.normalizer), _state(tokenizer.pre_tokenizer)
    plain_norm, plain_pre = _drop_prefix_space(norm), _drop_prefix_space(pre)
    if plain_norm == norm and plain_pre == pre:
        return tokenizer
    plain = Tokenizer(tokenizer.model)
    if plain_norm is not None:
        plain.normalizer = _component(normalizers.Sequence([]), plain_norm)
    if plain_pre is not None:
        plain.pre_tokenizer = _component(pre_tokenizers.Sequence([]), plain_pre)
    added = tokenizer.get_added_tokens_decoder()
    for i in sorted(added):
        (plain.add_special_tokens if added[i].special else plain.add_tokens)([added[i]])
    if any(plain.token_to_id(a.content) != i for i, a in added.items()):
        log.warning("grammar backend: the tokenizer's added tokens do not copy; forced text is spelled with "
                    "its space in front")
        return tokenizer
    return plain
