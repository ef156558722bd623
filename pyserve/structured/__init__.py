"""Structured outputs: JSON schema / json_object / regex / choice / Lark grammar constraints, as a
token bitmask the sampler applies (issue 17). See backend.py for the interface."""

from __future__ import annotations

from collections.abc import Sequence

from pyserve.loader.gguf_tokenizer import GGUFTokenizer
from pyserve.structured.backend import (CompiledGrammar, GrammarBackend, GrammarMatcher, allowed_ids,
                                        unpack_bitmask)
from pyserve.structured.spec import GrammarError, GrammarSpec

BACKENDS = ("llguidance",)


def create_backend(tokenizer: GGUFTokenizer, vocab_size: int, eos_token_ids: Sequence[int] = (),
                   name: str = "llguidance", **kwargs) -> GrammarBackend:
    """The grammar backend for one model: `vocab_size` is the model's (the mask's width, which may
    exceed the tokenizer's), `eos_token_ids` every id that ends a sequence (the tokenizer's EOS
    when empty). Built once per model (~0.2-0.7 s: the vocabulary as bytes), shared by requests."""
    eos = list(eos_token_ids)
    if not eos and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    if name == "llguidance":
        from pyserve.structured.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(tokenizer, vocab_size, eos, **kwargs)
    raise ValueError(f"unknown grammar backend {name!r} (available: {', '.join(BACKENDS)})")


__all__ = ["BACKENDS", "CompiledGrammar", "GrammarBackend", "GrammarError", "GrammarMatcher", "GrammarSpec",
           "allowed_ids", "create_backend", "unpack_bitmask"]
