"""IncrementalDetokenizer against the real SmolLM2 tokenizer (byte-level BPE)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyserve.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok():
    from pyserve.loader import default_gguf_path, load_tokenizer

    # `make setup` installs the default model; its absence is a failure, not a skip.
    return load_tokenizer(default_gguf_path())


PROMPT = "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"


def stream(tok, ids, stop=(), include=False, skip=True, prompt=PROMPT, finish=True):
    """Push ids one by one (stopping at a stop string); check the invariants after every step."""
    d = IncrementalDetokenizer(tok.tokenizer, tok.encode(prompt), skip, list(stop), include)
    prefixes = {s[:i] for s in stop for i in range(1, len(s))}
    chunks = []
    for n, i in enumerate(ids, 1):
        chunks.append(d.push(i))
        assert "".join(chunks) == d.text
        assert d.token_ids == list(ids[:n])
        if d.stop_matched is not None:
            break
        # Without a match, what is not released yet is only a possible stop-string start
        # (or an incomplete character, when the text so far ends in one).
        full = tok.decode(ids[:n], skip_special_tokens=skip)
        assert full.startswith(d.text)
        rest = full[len(d.text) :]
        assert rest == "" or rest in prefixes or rest.endswith("\ufffd"), (full, d.text)
    if finish and d.stop_matched is None:
        chunks.append(d.finish())
    assert "".join(chunks) == d.text
    return chunks, d


TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "def f(x):\n    return x  # done\n\n\n\tindented\t\ttabs    and    spaces   \n",
    "    leading spaces, trailing spaces    ",
    "世界你好，这是一个中文句子。日本語のテキストも：ありがとう、世界！",
    "한국어 문장입니다.",
    "emoji: 😀🎉🚀 flags 🇫🇷🇯🇵 skin 👍🏽 family 👨‍👩‍👧‍👦 "
    "rainbow 🏳️‍🌈 keycap 1️⃣",
    "accents: naïve café Ærøskøbing Straße façade Dvořák ŁÓDŹ",
    "mixed: x²+y²=z² → ∑∫ π≈3.14159 ¿Qué? «ok» 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width",
    "😀",
    "a",
    "",
]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
@pytest.mark.parametrize("skip", [True, False])
def test_stream_matches_full_decode(tok, text, skip):
    ids = tok.encode(text)
    chunks, d = stream(tok, ids, skip=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "\ufffd" not in full
    assert all("\ufffd" not in c for c in chunks)
    assert d.text == full
    assert d.stop_matched is None


def test_multibyte_split_across_tokens_is_held(tok):
    ids = tok.encode("世")
    assert len(ids) > 1 and all("\ufffd" in tok.decode([i]) for i in ids)  # really split
    chunks, _ = stream(tok, ids, finish=False)
    assert chunks == [""] * (len(ids) - 1) + ["世"]


def test_no_prompt_and_prompt_cut_mid_character(tok):
    ids = tok.encode("café 😀 ok")
    d = IncrementalDetokenizer(tok.tokenizer, [], True, [])
    assert "".join(d.push(i) for i in ids) + d.finish() == tok.decode(ids)
    # A prompt whose last tokens are half an emoji must not garble the output.
    half = tok.encode("😀")[:-1]
    d = IncrementalDetokenizer(tok.tokenizer, tok.encode("hi ") + half, True, [])
    assert "".join(d.push(i) for i in ids) + d.finish() == tok.decode(ids)


def test_window_is_bounded(tok):
    """Each step decodes a few recent tokens, never the whole output."""
    lengths = []

    class Counting:
        def decode(self, ids, skip_special_tokens):
            lengths.append(len(ids))
            return tok.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(TEXTS) * 20)
    assert len(ids) > 1000
    d = IncrementalDetokenizer(Counting(), tok.encode(PROMPT), True, ["never appears ~~"])
    text = "".join(d.push(i) for i in ids) + d.finish()
    assert text == tok.decode(ids)
    assert max(lengths) <= 16


def test_finish_flushes_incomplete_character(tok):
    ids = tok.encode("ok 😀")[:-1]  # the emoji's last byte never comes
    chunks, d = stream(tok, ids)
    assert chunks[-1].endswith("\ufffd")
    assert d.text == tok.decode(ids)
    assert d.finish() == "" and d.push(tok.encode("x")[0]) == ""


# -- stop strings ---------------------------------------------------------------------------------


def pieces(tok, text):
    ids = tok.encode(text)
    return ids, [tok.decode([i]) for i in ids]


def test_stop_single_token(tok):
    ids, p = pieces(tok, "Hello world. The end is near.")
    assert " end" in p
    chunks, d = stream(tok, ids, stop=[" end"])
    assert d.stop_matched == " end"
    assert d.text == "Hello world. The"
    assert len(d.token_ids) == p.index(" end") + 1  # stopped on the token completing it


@pytest.mark.parametrize("stop", [" world.", ". The end", "world. The e"])
def test_stop_spanning_tokens(tok, stop):
    text = "Hello world. The end is near."
    ids, p = pieces(tok, text)
    chunks, d = stream(tok, ids, stop=[stop])
    assert d.stop_matched == stop
    assert d.text == text[: text.index(stop)]
    # It completes inside the token where the cumulative text first contains it.
    n = next(k for k in range(1, len(ids) + 1) if stop in "".join(p[:k]))
    assert len(d.token_ids) == n and n >= 2


def test_stop_starting_mid_token(tok):
    text = "Hello world. The end is near."
    ids, p = pieces(tok, text)
    assert " world" in p  # "orld" starts inside " world"
    chunks, d = stream(tok, ids, stop=["orld. Th"])
    assert d.text == "Hello w"
    assert d.stop_matched == "orld. Th"
    # "o" of "Hello" is held (it could start the stop string) until " world" rules it out, then
    # "orld" is held and never released.
    assert chunks == ["Hell", "o w", "", ""]


def test_stop_ending_mid_token_drops_rest_of_token(tok):
    text = "Hello world. The end is near."
    ids, _ = pieces(tok, text)
    _, d = stream(tok, ids, stop=["wor"])
    assert d.text == "Hello " and d.stop_matched == "wor"
    _, d = stream(tok, ids, stop=["wor"], include=True)
    assert d.text == "Hello wor"


def test_stop_prefix_of_longer_stop(tok):
    ids, p = pieces(tok, "xx foobar yy")
    assert p[1:3] == [" foo", "bar"]
    for stops in (["foo", "foobar"], ["foobar", "foo"]):
        _, d = stream(tok, ids, stop=stops)
        assert d.stop_matched == "foo" and d.text == "xx "
        _, d = stream(tok, ids, stop=stops, include=True)
        assert d.stop_matched == "foo" and d.text == "xx foo"
    # The longer one alone: "foo" is held back until "bar" completes it.
    chunks, d = stream(tok, ids, stop=["foobar"])
    assert d.text == "xx " and d.stop_matched == "foobar"


def test_earliest_stop_wins(tok):
    text = "The story has an end, and then a beginning."
    ids, _ = pieces(tok, text)
    for stops in (["beginning", "end", "story"], ["story", "end"], ["end", "story"]):
        _, d = stream(tok, ids, stop=stops)
        assert d.stop_matched == "story" and d.text == "The "
    # Same token completes two stop strings: the one complete first in the text wins.
    _, d = stream(tok, ids, stop=[" has an end", "has"])
    assert d.stop_matched == "has" and d.text == "The story "


def test_near_miss_is_released(tok):
    ids, p = pieces(tok, "a ## b ###EN c ###END d")
    chunks, d = stream(tok, ids, stop=["###END"])
    assert d.stop_matched == "###END"
    assert d.text == "a ## b ###EN c "
    # " ##" is held (could start "###END") and released by " b", which breaks the match.
    k = p.index(" ##")
    assert chunks[k] == " "
    assert chunks[k + 1] == "## b"
    # " ###" + "EN" held until " c".
    k = p.index(" ###")
    assert chunks[k] == " " and chunks[k + 1] == "" and chunks[k + 2] == "###EN c"


def test_include_stop_str_in_output(tok):
    ids, _ = pieces(tok, "a ## b ###EN c ###END d")
    chunks, d = stream(tok, ids, stop=["###END"], include=True)
    assert d.text == "a ## b ###EN c ###END"
    assert d.stop_matched == "###END"
    assert d.push(ids[-1]) == "" and d.finish() == ""


def test_finish_releases_held_text(tok):
    ids, _ = pieces(tok, "the total is ##")
    chunks, d = stream(tok, ids, stop=["###"], finish=False)
    assert d.text == "the total is "
    assert d.finish() == "##"
    assert d.text == "the total is ##" and d.stop_matched is None
    assert d.finish() == ""


def test_push_after_stop_returns_nothing(tok):
    ids, _ = pieces(tok, "one two three four")
    d = IncrementalDetokenizer(tok.tokenizer, [], True, [" two"])
    out = [d.push(i) for i in ids]
    assert out[0] == "one" and all(c == "" for c in out[1:])
    assert d.text == "one" and d.stop_matched == " two"


# -- special tokens -------------------------------------------------------------------------------


def test_special_tokens(tok):
    ids = tok.encode("Hi there<|im_end|>\n<|im_start|>more")
    assert tok.eos_token_id in ids or 2 in ids
    _, d = stream(tok, ids, skip=True)
    assert d.text == "Hi there\nmore"
    _, d = stream(tok, ids, skip=False)
    assert d.text == "Hi there<|im_end|>\n<|im_start|>more"
    # A stop string can match a special token's text only when it is shown.
    _, d = stream(tok, ids, skip=False, stop=["<|im_end|>"])
    assert d.text == "Hi there" and d.stop_matched == "<|im_end|>"
    _, d = stream(tok, ids, skip=True, stop=["<|im_end|>"])
    assert d.text == "Hi there\nmore" and d.stop_matched is None


def test_held_partial_character_then_special_token(tok):
    ids = tok.encode("😀")
    ids = ids[:-1] + tok.encode("<|im_end|>") + ids[-1:]
    for skip in (True, False):
        _, d = stream(tok, ids, skip=skip)
        assert d.text == tok.decode(ids, skip_special_tokens=skip)


# -- property test --------------------------------------------------------------------------------


def reference(full: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Decode everything, then cut at the stop string occurring first in the full text.

    "First" is by where the occurrence ends (the first point at which the text contains a stop
    string), ties broken by the earlier start: this is what a reader of the text, one character
    at a time, would see first, whatever the token boundaries.
    """
    best = None
    for s in stops:
        i = full.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    if best is None:
        return full, None
    end, start, s = best
    return full[: end if include else start], s


@st.composite
def text_and_stops(draw):
    random_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
    text = draw(random_text | st.sampled_from(TEXTS))
    stops = []
    for _ in range(draw(st.integers(0, 4))):
        if text and draw(st.booleans()):
            i = draw(st.integers(0, len(text) - 1))
            j = draw(st.integers(i + 1, min(len(text), i + 8)))
            stops.append(text[i:j])
        else:
            stops.append(draw(st.text(min_size=1, max_size=4)))
    return text, stops


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=text_and_stops(), include=st.booleans(), skip=st.booleans())
def test_property_stream_equals_reference(tok, data, include, skip):
    text, stops = data
    ids = tok.encode(text)
    full = tok.decode(ids, skip_special_tokens=skip)
    d = IncrementalDetokenizer(tok.tokenizer, tok.encode(PROMPT), skip, stops, include)
    out = []
    for i in ids:
        out.append(d.push(i))
        if d.stop_matched is not None:
            break
    else:
        out.append(d.finish())
    streamed = "".join(out)
    expected, matched = reference(full, stops, include)
    assert streamed == d.text == expected
    assert d.stop_matched == matched
    if not include:
        assert not any(s in streamed for s in stops)
    if "\ufffd" not in full:
        assert all("\ufffd" not in c for c in out)


def test_samples_share_their_stop_prefixes(tok):
    """n samples of one request hold one set of stop-string prefixes, not n (each costs quadratic memory)."""
    stops = ["x" * 1000, "y" * 900]
    a, b = (IncrementalDetokenizer(tok.tokenizer, [1], True, list(stops)) for _ in range(2))
    assert a._stop_prefixes is b._stop_prefixes and len(a._stop_prefixes) == 999 + 899
