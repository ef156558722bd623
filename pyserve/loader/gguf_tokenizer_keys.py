"""Every `tokenizer.*` key of a GGUF file is read, known to change nothing for the tokenizers we
build (with the reason), or refused by name: a key skipped silently is text tokenized differently
from how the model was trained."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyserve.loader.gguf_types import GGUFError

READ_KEYS = frozenset({
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
})

_ENCODER_ONLY = "used by BERT-style encoders (tokenizer model 'bert', which is refused)"
_UNIGRAM = "llama.cpp applies it only in T5's Unigram tokenizer (model 't5', which is refused)"
_INFILL = "fill-in-the-middle ids for llama.cpp's /infill endpoint, which pyserve does not have"
IGNORED_KEYS = {
    "tokenizer.ggml.cls_token_id": _ENCODER_ONLY,
    "tokenizer.ggml.seperator_token_id": _ENCODER_ONLY,  # sic: llama.cpp's spelling
    "tokenizer.ggml.mask_token_id": _ENCODER_ONLY,
    "tokenizer.ggml.add_sep_token": _ENCODER_ONLY,
    "tokenizer.ggml.token_type_count": _ENCODER_ONLY,
    "tokenizer.ggml.normalizer.lowercase": _ENCODER_ONLY,
    "tokenizer.ggml.normalizer.strip_accents": _ENCODER_ONLY,
    "tokenizer.ggml.precompiled_charsmap": _UNIGRAM,
    "tokenizer.ggml.remove_extra_whitespaces": _UNIGRAM,
    "tokenizer.ggml.prefix_token_id": _INFILL,
    "tokenizer.ggml.suffix_token_id": _INFILL,
    "tokenizer.ggml.middle_token_id": _INFILL,
    "tokenizer.ggml.fim_pre_token_id": _INFILL,
    "tokenizer.ggml.fim_suf_token_id": _INFILL,
    "tokenizer.ggml.fim_mid_token_id": _INFILL,
    "tokenizer.ggml.fim_pad_token_id": _INFILL,
    "tokenizer.ggml.fim_rep_token_id": _INFILL,
    "tokenizer.ggml.fim_sep_token_id": _INFILL,
    "tokenizer.ggml.suppress_tokens": "Whisper's decoder-side token suppression; no text model uses it",
    "tokenizer.chat_templates": "the names of the named alternative templates (tokenizer.chat_template.NAME)",
    "tokenizer.huggingface.json": "an embedded copy of tokenizer.json that old converters wrote; llama.cpp "
                                  "ignores it too and the tokenizer.ggml.* keys describe the same tokenizer",
}
# Prefixes of keys that come in families.
IGNORED_PREFIXES = {
    "tokenizer.chat_template.": "named alternative chat templates (e.g. tool_use); the default template is used",
}


def check_tokenizer_keys(meta: Mapping[str, Any], path: str) -> None:
    for key in meta:
        if not key.startswith("tokenizer.") or key in READ_KEYS or key in IGNORED_KEYS:
            continue
        if any(key.startswith(p) for p in IGNORED_PREFIXES):
            continue
        raise GGUFError(f"{path}: GGUF tokenizer key {key!r} is not understood by pyserve")
