"""The grammar layer of structured outputs (pyserve/structured, llguidance behind our interface).

Every test runs on each vocabulary spelling pyserve builds: the default model's GGUF (byte-level
BPE, 49152 tokens), a tiny byte-level BPE trained here with `tokenizers` (an HF folder's kind), a
tiny SentencePiece-style BPE with byte fallback ("▁", "<0x41>") built by the GGUF tokenizer
builder; plus, when llama.cpp's vocabulary files are cached (tests/llamacpp.py), Llama 2's
SentencePiece and Llama 3's 128k byte-level vocabularies with their real EOS ids.
The tiny ones get a model vocabulary 40 ids larger than the tokenizer's, as padded models have.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pyserve.loader.gguf_tokenizer import GGUFTokenizer, load_tokenizer
from pyserve.loader.gguf_tokenizer_build import build_tokenizer
from pyserve.loader.gguf_weights import default_gguf_path
from pyserve.structured import GrammarError, GrammarSpec, allowed_ids, create_backend, unpack_bitmask
from pyserve.structured.vocab import plain_encoder, token_bytes

llguidance = pytest.importorskip("llguidance")

LLAMA_CPP_MODELS = Path.home() / ".cache" / "pyserve-tests" / "llama.cpp" / "0.3.36" / "models"

CORPUS = ['{"name": "Ada", "age": 36, "tags": ["math", "poetry"], "ok": true, "x": null, "nested": {"k": -1.5e3}}',
          "hello world, the quick brown fox jumps over the lazy dog 0123456789 café 日本 yes no maybe later"] * 10


def tiny_byte_level() -> GGUFTokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return GGUFTokenizer(tokenizer=tok, bos_token_id=None, eos_token_id=1, unk_token_id=None, pad_token_id=None,
                         add_bos_token=False, add_eos_token=False, chat_template=None)


def tiny_sentencepiece() -> GGUFTokenizer:
    """Llama-2-style: control tokens, the 256 byte tokens, then pieces (merges derived from scores).
    No piece holds "é" or "日": those come out as byte tokens."""
    pieces = ["▁", "{", "}", "[", "]", ":", ",", '"', "-", ".", "e", "▁{", '▁"', '":', '",', "▁[", "]}", "true",
              "false", "null", "▁true", "▁null", "name", "age", "tags", "yes", "no", "▁maybe", "▁later"]
    pieces += [c for c in "abcdfghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" if c not in pieces]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    return GGUFTokenizer(tokenizer=build_tokenizer(meta), bos_token_id=1, eos_token_id=2, unk_token_id=0,
                         pad_token_id=None, add_bos_token=True, add_eos_token=False, chat_template=None)


def _llama_cpp(name: str):
    path = LLAMA_CPP_MODELS / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} not cached (python tests/llamacpp.py)")
    return load_tokenizer(str(path))


# name -> (tokenizer, model vocab size, EOS ids)
KINDS = ["default_gguf", "tiny_byte_level", "tiny_sentencepiece", "llama2_spm", "llama3_bpe"]
_SETUPS: dict[str, tuple] = {}


def setup_for(kind: str):
    if kind not in _SETUPS:
        if kind == "default_gguf":
            tok = load_tokenizer(default_gguf_path())
            _SETUPS[kind] = (tok, tok.tokenizer.get_vocab_size(), [tok.eos_token_id])
        elif kind == "tiny_byte_level":
            tok = tiny_byte_level()
            _SETUPS[kind] = (tok, tok.tokenizer.get_vocab_size() + 40, [1, 0])
        elif kind == "tiny_sentencepiece":
            tok = tiny_sentencepiece()
            _SETUPS[kind] = (tok, tok.tokenizer.get_vocab_size() + 40, [2])
        elif kind == "llama2_spm":
            tok = _llama_cpp("llama-spm")
            _SETUPS[kind] = (tok, 32000, [2])
        else:
            tok = _llama_cpp("llama-bpe")
            _SETUPS[kind] = (tok, 128256, [128009, 128001])  # <|eot_id|>, <|end_of_text|>
    return _SETUPS[kind]


_BACKENDS: dict[str, object] = {}
_VOCABS: dict[str, list[bytes]] = {}


@pytest.fixture(params=KINDS)
def env(request):
    """(backend, tokenizer, token bytes); one backend per vocabulary for the whole module."""
    tok, vocab_size, eos = setup_for(request.param)
    if request.param not in _BACKENDS:
        _BACKENDS[request.param] = create_backend(tok, vocab_size, eos)
    backend = _BACKENDS[request.param]
    if request.param not in _VOCABS:
        _VOCABS[request.param] = token_bytes(tok.tokenizer, vocab_size, tuple(eos)).tokens
    return backend, tok, _VOCABS[request.param]


_ENCODERS: dict[int, Tokenizer] = {}


def ids_for(tok: GGUFTokenizer, vocab: list[bytes], text: str) -> list[int]:
    """The tokenizer's ids for `text` as a model would write them mid-output: without the space a
    SentencePiece tokenizer puts in front of a text (llguidance takes the tokenizer's spelling of
    the text a grammar forces, such as a JSON object's '{"', as the one to allow)."""
    if id(tok) not in _ENCODERS:
        _ENCODERS[id(tok)] = plain_encoder(tok.tokenizer)
    ids = _ENCODERS[id(tok)].encode(text, add_special_tokens=False).ids
    assert b"".join(vocab[i] for i in ids) == text.encode()
    return ids


def row_for(backend) -> torch.Tensor:
    return torch.zeros(backend.num_words, dtype=torch.int32)


def allowed(backend, matcher) -> set[int]:
    row = row_for(backend)
    matcher.fill_bitmask(row)
    return set(allowed_ids(row, backend.vocab_size))


def walk(backend, matcher, ids):
    """Each id must be allowed by the mask and accepted."""
    row = row_for(backend)
    for n, t in enumerate(ids):
        matcher.fill_bitmask(row)
        assert unpack_bitmask(row, backend.vocab_size)[t], f"token {n} ({t}) not allowed"
        assert matcher.accept_token(t), f"token {n} ({t}) rejected: {matcher.error}"


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
                    "required": ["city"]},
        "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["name", "age", "role", "tags", "address"],
}
VALID = {"name": "Zoë 日本", "age": 36, "role": "editor", "tags": ["math", "café"],
         "address": {"city": "London", "zip": None}, "nickname": None}


# -- vocabulary bytes ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_token_bytes_agree_with_llguidance_reading_the_tokenizer_json(kind):
    """Our bytes for every non-special id equal what llguidance's own HF tokenizer reader makes of
    the same tokenizer (it knows both spellings from the tokenizer.json decoders)."""
    tok, vocab_size, eos = setup_for(kind)
    ours = token_bytes(tok.tokenizer, vocab_size, tuple(eos))
    theirs = llguidance.LLTokenizer(tok.tokenizer.to_str())
    n = tok.tokenizer.get_vocab_size()
    diff = [i for i in range(n) if i not in ours.special_ids and not theirs.is_special_token(i)
            and ours.tokens[i] != theirs.decode_bytes([i])]
    assert diff == [], [(i, ours.tokens[i], theirs.decode_bytes([i])) for i in diff[:5]]
    assert all(ours.tokens[i] == b"" and i in ours.special_ids for i in range(n, vocab_size))


def test_token_bytes_of_both_spellings():
    spm = tiny_sentencepiece()
    v = token_bytes(spm.tokenizer, spm.tokenizer.get_vocab_size())
    t = spm.tokenizer.token_to_id
    assert v.kind == "sentencepiece"
    assert v.tokens[t("<0x41>")] == b"A" and v.tokens[t("<0xC3>")] == b"\xc3"
    assert v.tokens[t("▁maybe")] == b" maybe" and v.tokens[t("▁")] == b" "
    assert {0, 1, 2} <= v.special_ids
    bl = tiny_byte_level()
    v = token_bytes(bl.tokenizer, bl.tokenizer.get_vocab_size())
    assert v.kind == "byte_level"
    assert v.tokens[bl.tokenizer.token_to_id("Ġ")] == b" " and v.tokens[bl.tokenizer.token_to_id("Ã")] == b"\xc3"
    assert v.special_ids == {0, 1}


# -- walking valid outputs -------------------------------------------------------------------


@pytest.mark.parametrize("whitespace_flexible", [True, False])
def test_valid_json_walks_to_the_end(env, whitespace_flexible):
    backend, tok, vocab = env
    spec = GrammarSpec.json_schema(SCHEMA, whitespace_flexible=whitespace_flexible)
    text = json.dumps(VALID, ensure_ascii=False, separators=(", ", ": ") if whitespace_flexible else (",", ":"))
    m = backend.new_matcher(backend.compile(spec))
    assert not m.can_terminate()
    walk(backend, m, ids_for(tok, vocab, text))
    # The closing brace ends a JSON value: nothing but EOS may follow.
    assert m.can_terminate() and m.is_terminated()
    assert allowed(backend, m) == set(backend.eos_token_ids)
    assert m.accept_token(backend.eos_token_ids[0]) and m.is_terminated()


def test_pretty_printed_json_walks_with_flexible_whitespace(env):
    backend, tok, vocab = env
    m = backend.new_matcher(backend.compile(GrammarSpec.json_schema(SCHEMA)))
    walk(backend, m, ids_for(tok, vocab, json.dumps(VALID, indent=2, ensure_ascii=False)))
    assert m.is_terminated()


def test_compact_whitespace_refuses_spaces(env):
    backend, tok, vocab = env
    m = backend.new_matcher(backend.compile(GrammarSpec.json_schema(SCHEMA, whitespace_flexible=False)))
    walk(backend, m, ids_for(tok, vocab, '{"name":'))
    assert all(not vocab[i].startswith(b" ") for i in allowed(backend, m))


def test_invalid_continuation_is_disallowed(env):
    backend, tok, vocab = env
    m = backend.new_matcher(backend.compile(GrammarSpec.json_schema(SCHEMA)))
    walk(backend, m, ids_for(tok, vocab, '{"name": "Ada", "age": '))
    ok = allowed(backend, m)
    # A string where an integer must come, and a negative integer (minimum 0), are not allowed.
    for bad in ('"', "-", "}", "x"):
        ids = [i for i, b in enumerate(vocab) if b == bad.encode()]
        assert ids and not ok & set(ids), bad
    assert any(vocab[i] == b"3" for i in ok)
    assert not m.can_terminate() and not set(backend.eos_token_ids) & ok
    # Accepting a disallowed token fails for good; the mask then allows only EOS.
    bad = next(i for i, b in enumerate(vocab) if b == b"}")
    assert not m.accept_token(bad)
    assert m.error and m.is_terminated()
    assert allowed(backend, m) == set(backend.eos_token_ids)
    assert not m.accept_token(next(i for i, b in enumerate(vocab) if b == b"3"))


def test_json_object_takes_any_object_only(env):
    backend, tok, vocab = env
    compiled = backend.compile(GrammarSpec.json_object())
    m = backend.new_matcher(compiled)
    first = allowed(backend, m)
    assert first and all(vocab[i].startswith(b"{") for i in first)
    walk(backend, m, ids_for(tok, vocab, '{"a": [1, 2.5, {"b": null}], "c": "d", "e": {}}'))
    assert m.is_terminated()


def test_regex(env):
    backend, tok, vocab = env
    compiled = backend.compile(GrammarSpec.regex(r"[0-9]{3}-[a-z]+"))
    m = backend.new_matcher(compiled)
    walk(backend, m, ids_for(tok, vocab, "123-"))
    assert not m.can_terminate() and not set(backend.eos_token_ids) & allowed(backend, m)
    walk(backend, m, ids_for(tok, vocab, "abc"))
    assert m.can_terminate() and not m.is_terminated()  # more letters may follow
    ok = allowed(backend, m)
    assert set(backend.eos_token_ids) <= ok
    assert all(i in backend.eos_token_ids or re.fullmatch(rb"[a-z]+", vocab[i]) for i in ok)
    assert m.accept_token(backend.eos_token_ids[-1]) and m.is_terminated()


def test_choice(env):
    backend, tok, vocab = env
    choices = ["yes", "no", "maybe later"]
    m = backend.new_matcher(backend.compile(GrammarSpec.choice(choices)))
    first = allowed(backend, m)
    assert first and all(any(c.encode().startswith(vocab[i]) for c in choices) for i in first)
    walk(backend, m, ids_for(tok, vocab, "maybe later"))
    assert m.is_terminated() and allowed(backend, m) == set(backend.eos_token_ids)


def test_lark_grammar(env):
    backend, tok, vocab = env
    lark = 'start: "[" item ("," item)* "]"\nitem: /[0-9]+/ | "true" | "null"'
    m = backend.new_matcher(backend.compile(GrammarSpec.grammar(lark)))
    walk(backend, m, ids_for(tok, vocab, "[12,true,null,7]"))
    assert m.is_terminated()


def test_tool_call_grammar(env):
    """A tool call as tool-calling models write it: text around a JSON object that a schema
    constrains (llguidance's Lark `%json` rule)."""
    backend, tok, vocab = env
    schema = {"type": "object", "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                      "additionalProperties": False}}, "required": ["name", "arguments"], "additionalProperties": False}
    lark = 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + json.dumps(schema)
    m = backend.new_matcher(backend.compile(GrammarSpec.grammar(lark)))
    walk(backend, m, ids_for(tok, vocab, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "'))
    walk(backend, m, ids_for(tok, vocab, 'Paris"}}\n</tool_call>'))
    assert m.is_terminated()
    m = backend.new_matcher(backend.compile(GrammarSpec.grammar(lark)))
    walk(backend, m, ids_for(tok, vocab, '<tool_call>\n{"name": "'))
    assert not m.accept_token(ids_for(tok, vocab, "x")[0])  # only get_weather


# -- EOS and the vocabulary's edges ----------------------------------------------------------


def test_every_eos_id_allowed_exactly_when_the_grammar_may_end():
    tok = tiny_byte_level()
    eos = [1, 0, tok.tokenizer.get_vocab_size() + 3]  # a third EOS id past the tokenizer, inside the model's
    backend = create_backend(tok, tok.tokenizer.get_vocab_size() + 40, eos)
    vocab = token_bytes(tok.tokenizer, backend.vocab_size).tokens
    for end in eos:
        m = backend.new_matcher(backend.compile(GrammarSpec.regex("(ab)+c?")))
        for t in ids_for(tok, vocab, "ababc"):
            ok = allowed(backend, m)
            may_end = m.can_terminate()
            assert (set(eos) <= ok) == may_end and (not set(eos) & ok) == (not may_end)
            assert m.accept_token(t)
        assert m.is_terminated() and allowed(backend, m) == set(eos)
        assert m.accept_token(end) and m.is_terminated()
    # An EOS where the grammar may not end is refused.
    m = backend.new_matcher(backend.compile(GrammarSpec.regex("(ab)+c?")))
    assert not m.accept_token(eos[1])


def test_eos_ends_a_grammar_that_could_go_on(env):
    backend, tok, vocab = env
    for end in backend.eos_token_ids:
        m = backend.new_matcher(backend.compile(GrammarSpec.regex("a+")))
        walk(backend, m, ids_for(tok, vocab, "aa"))
        assert not m.is_terminated() and set(backend.eos_token_ids) <= allowed(backend, m)
        assert m.accept_token(end) and m.is_terminated()
        assert allowed(backend, m) == set(backend.eos_token_ids)


def test_ids_past_the_tokenizer_are_never_allowed(env):
    backend, tok, vocab = env
    n_tok = tok.tokenizer.get_vocab_size()
    specs = [GrammarSpec.regex("(?s:.*)"), GrammarSpec.json_object(), GrammarSpec.json_schema({"type": "string"})]
    prefixes = ["", "", '"any']
    row = row_for(backend)
    for spec, prefix in zip(specs, prefixes):
        m = backend.new_matcher(backend.compile(spec))
        walk(backend, m, ids_for(tok, vocab, prefix))
        m.fill_bitmask(row)
        bits = unpack_bitmask(row, 32 * backend.num_words)  # every bit of the row, past vocab_size too
        on = bits.nonzero().flatten().tolist()
        assert len(on) > 0
        extra = [i for i in on if i >= n_tok and i not in backend.eos_token_ids]
        assert extra == [], extra[:10]
        assert all(i < backend.vocab_size for i in on)
        special = [i for i, a in tok.tokenizer.get_added_tokens_decoder().items() if a.special]
        assert not (set(on) & set(special)) - set(backend.eos_token_ids)
    assert backend.num_words == (backend.vocab_size + 31) // 32


# -- errors ----------------------------------------------------------------------------------

BAD_SPECS = [
    (lambda: GrammarSpec.json_schema({"type": "objekt"}), "response_format", "objekt"),
    (lambda: GrammarSpec.json_schema({"type": "integer", "not": {"const": 3}}, param="structured_outputs.json"),
     "structured_outputs.json", "not supported"),
    (lambda: GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "response_format", "missing"),
    (lambda: GrammarSpec.json_schema({"type": "string", "pattern": "(?=x)y"}), "response_format", "look-around"),
    (lambda: GrammarSpec.json_schema({"type": "string", "minLength": 5, "maxLength": 2}), "response_format",
     "minLength"),
    (lambda: GrammarSpec.regex("a(b"), "structured_outputs.regex", "unclosed group"),
    (lambda: GrammarSpec.regex(r"(a)\1"), "structured_outputs.regex", "backreferences"),
    (lambda: GrammarSpec.grammar("start: foo"), "structured_outputs.grammar", "line 1, column 8"),
    (lambda: GrammarSpec.grammar("start: (\"a\""), "structured_outputs.grammar", "line 1"),
    (lambda: GrammarSpec.grammar("garbage {{{"), "structured_outputs.grammar", "Lark"),
]


@pytest.mark.parametrize("make, param, words", BAD_SPECS)
def test_invalid_grammars_raise_grammar_error_naming_the_param(make, param, words):
    tok, vocab_size, eos = setup_for("tiny_byte_level")
    backend = create_backend(tok, vocab_size, eos)
    with pytest.raises(GrammarError) as e:
        backend.compile(make())
    assert isinstance(e.value, ValueError)
    assert e.value.param == param and str(e.value).startswith(param + ": ")
    assert words in str(e.value), str(e.value)
    assert "<state>" not in str(e.value) and len(str(e.value)) < 1000


@pytest.mark.parametrize("make, param", [
    (lambda: GrammarSpec.json_schema([1, 2]), "response_format"),
    (lambda: GrammarSpec.json_schema("{not json", param="structured_outputs.json"), "structured_outputs.json"),
    (lambda: GrammarSpec.choice([]), "structured_outputs.choice"),
    (lambda: GrammarSpec.choice(["a", 1]), "structured_outputs.choice"),
    (lambda: GrammarSpec.choice("ab"), "structured_outputs.choice"),
    (lambda: GrammarSpec.regex(3), "structured_outputs.regex"),
    (lambda: GrammarSpec.grammar("  "), "structured_outputs.grammar"),
])
def test_malformed_values_raise_grammar_error(make, param):
    with pytest.raises(GrammarError) as e:
        make()
    assert e.value.param == param


def test_spec_is_a_hashable_cache_key():
    a = GrammarSpec.json_schema({"type": "object", "properties": {"b": {}, "a": {}}})
    b = GrammarSpec.json_schema('{"type": "object", "properties": {"b": {}, "a": {}}}', param="structured_outputs.json")
    assert a == b and hash(a) == hash(b)  # the param is not part of the key
    assert a != GrammarSpec.json_schema({"type": "object", "properties": {"a": {}, "b": {}}})  # key order matters
    assert a != GrammarSpec.json_schema(json.loads(a.value), whitespace_flexible=False)
    assert a.schema == {"type": "object", "properties": {"b": {}, "a": {}}}
    assert GrammarSpec.choice(["x", "y"]).value == ("x", "y")


def test_compile_cache_is_an_lru():
    tok, vocab_size, eos = setup_for("tiny_byte_level")
    backend = create_backend(tok, vocab_size, eos, cache_size=2)
    a, b, c = (GrammarSpec.regex(p) for p in ("a", "b", "c"))
    ca = backend.compile(a)
    assert backend.compile(GrammarSpec("regex", "a", param="x")) is ca
    backend.compile(b)
    backend.compile(a)  # a is now the most recent
    backend.compile(c)  # evicts b
    assert backend.compile(a) is ca and backend.cache_len() == 2
    assert backend.hits == 3 and backend.misses == 3
    # Matchers from one compiled grammar are independent.
    m1, m2 = backend.new_matcher(ca), backend.new_matcher(ca)
    assert m1.accept_token(tok.tokenizer.token_to_id("a"))
    assert not m2.is_terminated() and m1.is_terminated()


def test_unknown_backend_and_bad_rows():
    tok, vocab_size, eos = setup_for("tiny_byte_level")
    with pytest.raises(ValueError, match="unknown grammar backend"):
        create_backend(tok, vocab_size, eos, name="nope")
    backend = create_backend(tok, vocab_size, eos)
    m = backend.new_matcher(backend.compile(GrammarSpec.regex("a")))
    for bad in (torch.zeros(backend.num_words, dtype=torch.int64),
                torch.zeros(backend.num_words + 1, dtype=torch.int32),
                torch.zeros(2, backend.num_words, dtype=torch.int32)[:, 0]):
        with pytest.raises(ValueError, match="bitmask row"):
            m.fill_bitmask(bad)
    assert not m.accept_token(10**7)  # out of range: refused, not a crash


def test_a_dead_end_fails_the_matcher_and_allows_only_eos():
    """A grammar this vocabulary cannot continue: the matcher fails (terminated, with an error)
    and its row allows the EOS ids, never nothing."""
    wl = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<eos>": 2}, unk_token="<eos>"))
    tok = GGUFTokenizer(tokenizer=wl, bos_token_id=None, eos_token_id=2, unk_token_id=None, pad_token_id=None,
                        add_bos_token=False, add_eos_token=False, chat_template=None)
    backend = create_backend(tok, 3, [2])
    m = backend.new_matcher(backend.compile(GrammarSpec.regex("ac")))
    assert allowed(backend, m) == {0}
    assert m.accept_token(0)
    assert allowed(backend, m) == {2}
    assert m.error and m.is_terminated() and not m.can_terminate()
    assert not m.accept_token(2)


def test_fill_bitmasks_batch_matches_row_by_row(env):
    backend, tok, vocab = env
    specs = [GrammarSpec.json_schema(SCHEMA), GrammarSpec.regex("[a-z]+"), GrammarSpec.json_object(),
             GrammarSpec.choice(["yes", "no"])]
    prefixes = ['{"name": "A', "ab", '{"k": [', "y"]
    matchers = []
    for s, p in zip(specs, prefixes):
        m = backend.new_matcher(backend.compile(s))
        walk(backend, m, ids_for(tok, vocab, p))
        matchers.append(m)
    broken = backend.new_matcher(backend.compile(GrammarSpec.regex("a")))
    broken.accept_token(next(i for i, b in enumerate(vocab) if b == b"z"))
    matchers.append(broken)
    rows = [4, 0, 5, 2, 1]
    batch = backend.allocate_bitmask(7)
    backend.fill_bitmasks(list(zip(matchers, rows)), batch)
    for m, r in zip(matchers, rows):
        row = row_for(backend)
        m.fill_bitmask(row)
        assert torch.equal(batch[r], row)
    assert set(allowed_ids(batch[1], backend.vocab_size)) == set(backend.eos_token_ids)
    assert (batch[3] == -1).all() and (batch[6] == -1).all()  # rows not named: untouched


# -- random walks ----------------------------------------------------------------------------

WALK_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["a", "bb", "ccc"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "child": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                                   "note": {"anyOf": [{"type": "string", "maxLength": 3},
                                                                      {"type": "null"}]}},
                  "required": ["x"], "additionalProperties": False},
        "score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
    },
    "required": ["id", "kind", "ok"],
    "additionalProperties": False,
}


def check(value, schema) -> None:
    """A validator for the keywords WALK_SCHEMA uses (jsonschema is not a dependency)."""
    if "anyOf" in schema:
        errors = []
        for sub in schema["anyOf"]:
            try:
                return check(value, sub)
            except AssertionError as e:
                errors.append(e)
        raise AssertionError(f"{value!r} matches no anyOf branch: {errors}")
    if "enum" in schema:
        assert value in schema["enum"], value
    t = schema.get("type")
    if t == "object":
        assert isinstance(value, dict), value
        props = schema.get("properties", {})
        assert set(schema.get("required", ())) <= value.keys(), value
        if schema.get("additionalProperties") is False:
            assert value.keys() <= props.keys(), value
        for k, v in value.items():
            if k in props:
                check(v, props[k])
    elif t == "array":
        assert isinstance(value, list) and len(value) <= schema.get("maxItems", len(value)), value
        for v in value:
            check(v, schema["items"])
    elif t == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value)), value
    elif t in ("integer", "number"):
        assert isinstance(value, int if t == "integer" else (int, float)) and not isinstance(value, bool), value
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), value
    elif t == "boolean":
        assert isinstance(value, bool), value
    elif t == "null":
        assert value is None


_WEIGHTS: dict[int, torch.Tensor] = {}


def random_walk(backend, matcher, vocab, gen: torch.Generator, limit: int) -> bytes:
    """Sample allowed tokens until the grammar ends. Whitespace-only tokens are rarely drawn and
    tokens that close something ('"', '}', ']') often, so that free text ends within the limit."""
    if id(vocab) not in _WEIGHTS:
        _WEIGHTS[id(vocab)] = torch.tensor([0.02 if b and not b.strip() else 30.0 if re.search(rb'["}\]]', b) else 1.0
                                            for b in vocab], dtype=torch.float64)
    weights = _WEIGHTS[id(vocab)].clone()
    weights[list(backend.eos_token_ids)] = 1.0
    row = row_for(backend)
    out = []
    for _ in range(limit):
        if matcher.is_terminated():
            return b"".join(out)
        matcher.fill_bitmask(row)
        ok = unpack_bitmask(row, backend.vocab_size)
        assert ok.any(), "a mask that allows nothing"
        t = int(torch.multinomial(weights * ok, 1, generator=gen))
        assert matcher.accept_token(t), matcher.error
        if t in backend.eos_token_ids:
            return b"".join(out)
        out.append(vocab[t])
    raise AssertionError(f"no end within {limit} tokens: {b''.join(out)[:300]!r}")


@pytest.mark.parametrize("seed", range(3))
def test_random_walk_json_schema(env, seed):
    backend, tok, vocab = env
    gen = torch.Generator().manual_seed(seed)
    for flexible in (True, False):
        m = backend.new_matcher(backend.compile(GrammarSpec.json_schema(WALK_SCHEMA, whitespace_flexible=flexible)))
        check(json.loads(random_walk(backend, m, vocab, gen, 600).decode("utf-8")), WALK_SCHEMA)


@pytest.mark.parametrize("seed", range(3))
def test_random_walk_json_object_regex_choice(env, seed):
    backend, tok, vocab = env
    rng = torch.Generator().manual_seed(100 + seed)
    m = backend.new_matcher(backend.compile(GrammarSpec.json_object()))
    value = json.loads(random_walk(backend, m, vocab, rng, 1500).decode("utf-8"))
    assert isinstance(value, dict)
    pattern = r"[A-Z][a-z]{1,5}-[0-9]{2,4}(\.[a-z]{2})?"
    m = backend.new_matcher(backend.compile(GrammarSpec.regex(pattern)))
    assert re.fullmatch(pattern, random_walk(backend, m, vocab, rng, 100).decode("utf-8"))
    choices = ("yes", "no", "maybe later", "日本")
    m = backend.new_matcher(backend.compile(GrammarSpec.choice(choices)))
    assert random_walk(backend, m, vocab, rng, 50).decode("utf-8") in choices


# -- threads ---------------------------------------------------------------------------------


def test_compile_in_a_worker_thread_while_filling_masks():
    """The engine thread fills masks and advances matchers while another thread compiles; the
    masks are the same as without the other thread."""
    tok, vocab_size, eos = setup_for("default_gguf")
    backend = create_backend(tok, vocab_size, eos)
    vocab = token_bytes(tok.tokenizer, vocab_size).tokens
    ids = ids_for(tok, vocab, json.dumps(VALID, ensure_ascii=False))
    compiled = backend.compile(GrammarSpec.json_schema(SCHEMA))

    def masks() -> list[torch.Tensor]:
        m = backend.new_matcher(compiled)
        out = []
        for t in ids:
            row = row_for(backend)
            m.fill_bitmask(row)
            out.append(row)
            assert m.accept_token(t)
        return out

    reference = masks()
    stop = threading.Event()
    errors: list[BaseException] = []

    def compile_loop():
        try:
            n = 0
            while not stop.is_set():
                schema = dict(WALK_SCHEMA, title=f"t{n}")  # a new key each time: a real compile
                backend.new_matcher(backend.compile(GrammarSpec.json_schema(schema)))
                backend.compile(GrammarSpec.regex(f"[a-z]{{{n % 9 + 1}}}"))
                n += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    worker = threading.Thread(target=compile_loop)
    worker.start()
    try:
        for _ in range(3):
            got = masks()
            assert all(torch.equal(a, b) for a, b in zip(got, reference))
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
