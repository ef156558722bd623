"""How a byte-level BPE vocabulary cuts text into words before merging, by `tokenizer.ggml.pre`.

A GGUF names the pre-tokenizer but does not carry it, so each name maps to the pipeline of the
model's own tokenizer.json (which made llama.cpp's test vectors), the regexes of llama.cpp's
llama-vocab.cpp where those are the same, and llama.cpp's per-name flags (`ignore_merges`).
A name not listed here is refused: splitting text another model's way gives valid-looking but
wrong ids, which is worse than not loading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

from pyserve.loader.gguf_types import GGUFError


@dataclass(frozen=True)
class WordSplit:
    """One family's pre-tokenization; `build` makes a fresh pre-tokenizer (they are not shared)."""

    build: Callable[[], pre_tokenizers.PreTokenizer]
    # The vocabulary's tokenizer.json says "ignore_merges": a word that is itself a token is taken
    # whole even where the merges would cut it differently (Llama 3: 'Cửa Việt').
    ignore_merges: bool = False


def _byte_level(use_regex: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _regexes(*patterns: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    """Each regex cuts every piece left by the previous one, keeping matches and gaps alike
    (llama.cpp's unicode_regex_split, HF's Split(behavior="isolated")); then bytes -> byte-level."""
    return lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns] + [_byte_level(False)]
    )


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return _byte_level(True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # llama.cpp's "\p{N}" before GPT-2's regex; SmolLM2's and StarCoder's Digits(individual_digits).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)])


def _falcon() -> pre_tokenizers.PreTokenizer:
    # Falcon's tokenizer.json as it is: the digit stages run on the byte-level spelling, where a
    # byte such as 0xBD shows as "½", a number, so llama.cpp's regex rewrite is not quite the same.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(behavior="contiguous"),
        _byte_level(True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), behavior="isolated"),
    ])


# The regexes as the models' tokenizer.json write them; llama.cpp spells (?i:...) out as [sS]...
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5 keeps combining marks (\p{M}) inside words: 'កាន់' is one word, not three.
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek LLM's letter class is a list of code point ranges; escaped, because an editor that
# NFC-normalizes would fold endpoints such as U+1F7D into lookalikes and reverse their ranges.
_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
    "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)
_DEEPSEEK_CODER = ("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", "\\p{N}")

_GPT2 = WordSplit(_gpt2)
_DIGITS_FIRST = WordSplit(_digits_then_gpt2)

SPLITS: dict[str | None, WordSplit] = {
    # No name (files older than the key), "default" and "gpt2" were read as GPT-2 here before and
    # still are, as transformers reads them; llama.cpp uses early Falcon-like regexes for them.
    # Its converter has refused a BPE vocabulary it cannot name since 2024, so they are rare.
    None: _GPT2,
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    # GPT-NeoX's tokenizer.json: GPT-2's split; its runs of spaces are added tokens (see the builder).
    "mpt": _GPT2,
    "llama3": WordSplit(_regexes(_LLAMA3), ignore_merges=True),
    "llama-v3": WordSplit(_regexes(_LLAMA3), ignore_merges=True),
    "llama-bpe": WordSplit(_regexes(_LLAMA3), ignore_merges=True),
    "falcon3": WordSplit(_regexes(_LLAMA3), ignore_merges=True),
    "smaug-bpe": WordSplit(_regexes(_LLAMA3)),
    "dbrx": WordSplit(_regexes(_LLAMA3)),
    "qwen2": WordSplit(_regexes(_QWEN2)),
    "deepseek-r1-qwen": WordSplit(_regexes(_QWEN2)),
    "qwen35": WordSplit(_regexes(_QWEN35)),
    "deepseek-llm": WordSplit(_regexes(*_DEEPSEEK_LLM)),
    "deepseek-coder": WordSplit(_regexes(*_DEEPSEEK_CODER)),
    "falcon": WordSplit(_falcon),
    # SmolLM2's tokenizer.json has Digits(individual_digits=True); transformers' GGUF path splits
    # "smollm" like GPT-2, which gives the same ids only because SmolLM2 has no multi-digit tokens.
    "smollm": _DIGITS_FIRST,
    "starcoder": _DIGITS_FIRST,
    "refact": _DIGITS_FIRST,
    "command-r": _DIGITS_FIRST,
    "codeshell": _DIGITS_FIRST,
    "exaone": _DIGITS_FIRST,
    "minerva-7b": _DIGITS_FIRST,
}


def word_split(pre: str | None, path: str) -> WordSplit:
    split = SPLITS.get(pre)
    if split is None:
        known = ", ".join(sorted(k for k in SPLITS if k))
        raise GGUFError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {known})")
    return split
