"""Tool-call parsers, reasoning parsers and tool-choice schemas: pure unit tests, no server.

The central property: for any text and any way of splitting it into deltas, the stream's output
(content, calls, argument fragments) concatenates to what the non-streaming parse returns. Checked on
every split point of fixed texts and on random many-piece splits of generated ones (hypothesis)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyserve.server.protocol import APIError
from pyserve.server.reasoning import REASONING_PARSERS, ReasoningTokens, find_token_id, get_reasoning_parser
from pyserve.server.tool_parsers import (TOOL_PARSERS, NamedToolParser, RequiredToolParser, ToolCall,
                                         canonical_json, get_tool_parser, make_tool_call_id)
from pyserve.server.tool_schemas import EMPTY_PARAMETERS, parse_tool_request, required_schema

HERMES = TOOL_PARSERS["hermes"]
LLAMA = TOOL_PARSERS["llama3_json"]
R1 = REASONING_PARSERS["deepseek_r1"]
QWEN3 = REASONING_PARSERS["qwen3"]
JWS = " \t\n\r"
SETTINGS = dict(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- helpers -------------------------------------------------------------------------------------

def collect(deltas: list[dict]):
    """(content, [(index, id, name, arguments)]) from a stream's deltas, checking their shape: a call's
    first delta has index, id, type, name and arguments ""; the later ones only index and arguments;
    indices count up from 0 and every call keeps one id."""
    content = []
    calls: dict[int, list] = {}
    for d in deltas:
        assert len(d) == 1 and ("content" in d or "tool_calls" in d), d
        if "content" in d:
            assert isinstance(d["content"], str) and d["content"]
            content.append(d["content"])
            continue
        (tc,) = d["tool_calls"]
        i = tc["index"]
        if "id" in tc:
            assert i == len(calls), "indices count up from 0"
            assert tc["type"] == "function" and tc["function"]["arguments"] == ""
            assert isinstance(tc["id"], str) and tc["id"]
            assert set(tc) == {"index", "id", "type", "function"} and set(tc["function"]) == {"name", "arguments"}
            calls[i] = [i, tc["id"], tc["function"]["name"], ""]
        else:
            assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
            assert i in calls and tc["function"]["arguments"]
            calls[i][3] += tc["function"]["arguments"]
    return "".join(content), [tuple(c) for c in calls.values()]


def stream(parser, pieces, **kw):
    s = parser.streamer(**kw)
    deltas = []
    for p in pieces:
        deltas += s.feed(p)
    deltas += s.finish()
    content, calls = collect(deltas)
    ids = [c[1] for c in calls]
    assert len(set(ids)) == len(ids)
    return content, calls, s


def every_split(text):
    for k in range(len(text) + 1):
        yield [text[:k], text[k:]]


def random_split(text, rng, max_pieces=None):
    n = len(text)
    k = rng.randint(0, min(n, max_pieces or n))
    cuts = sorted(rng.sample(range(n + 1), k)) if n else []
    pieces, last = [], 0
    for c in cuts + [n]:
        pieces.append(text[last:c])
        last = c
    return pieces


def assert_stream_matches_extract(parser, text, splits, **kw):
    """Streaming with each split gives extract()'s content and calls (ids aside)."""
    content, calls = parser.extract(text, **kw)
    want = [(i, c.name, c.arguments) for i, c in enumerate(calls)]
    for pieces in splits:
        s_content, s_calls, s = stream(parser, pieces, **kw)
        assert not s.malformed
        assert s_content == (content or ""), pieces
        assert [(i, n, a) for i, _, n, a in s_calls] == want, pieces
        assert [(c.name, c.arguments) for c in s.calls] == [(n, a) for _, n, a in want]
        assert s.tools_called == bool(want)
    return content, calls


def stream_result(parser, pieces, **kw):
    content, calls, s = stream(parser, pieces, **kw)
    return content, [(i, n, a) for i, _, n, a in calls], s.malformed, s.tools_called


# ---- ids, ToolCall ---------------------------------------------------------------------------------

def test_tool_call_ids_are_vllm_style_and_unique():
    ids = {make_tool_call_id() for _ in range(1000)}
    assert len(ids) == 1000
    for i in ids:
        assert i.startswith("chatcmpl-tool-") and len(i) == len("chatcmpl-tool-") + 32
        int(i[len("chatcmpl-tool-"):], 16)
    tc = ToolCall("f", "{}")
    assert tc.to_dict() == {"id": tc.id, "type": "function", "function": {"name": "f", "arguments": "{}"}}


def test_registry_names():
    assert set(TOOL_PARSERS) >= {"hermes", "llama3_json"}
    assert get_tool_parser("hermes") is HERMES
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        get_tool_parser("nope")
    assert set(REASONING_PARSERS) >= {"deepseek_r1", "qwen3"}
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        get_reasoning_parser("nope")


# ---- canonical JSON (the arguments re-serialization) --------------------------------------------------

@pytest.mark.parametrize("text", [
    '{}', '{"a":1}', '{ "a" : [ 1 , 2.50 , -0 , 1e3, 1E-2, 0.1, 123456789012345678901234567890 ] }',
    '{"s": "\\u00e9\\u4f60\\ud83d\\ude00\\n\\t\\"\\\\\\/\\b\\f\\r\\u0001"}', '{"raw": "é你😀"}',
    '{"n": null, "t": true, "f": false, "o": {"x": {}}, "l": [[], [{}]]}', '"just a string"', '[1,[2,[3]]]',
    '-12', '  3.0  ', '{"del": "\\u007f\\u2028"}',
])
def test_canonical_json_equals_json_dumps(text):
    want = json.dumps(json.loads(text), ensure_ascii=False)
    assert canonical_json(text) == want
    for pieces in every_split(text):  # the incremental path, split anywhere
        from pyserve.server.tool_parsers import _JsonValue
        v = _JsonValue()
        out = []
        for p in pieces:
            i, o = v.feed(p)
            out.append(o)
            assert not p[i:].strip(JWS)
        out.append(v.finish())
        assert "".join(out) == want


@pytest.mark.parametrize("text", [
    '{"a": 1,}', '{"a" 1}', '[1 2]', '{"a": 01}', '{"a": -}', '{"a": 1.}', '{"a": .5}', '{"a": tru}',
    '{"a": True}', '{"a": NaN}', '{"a": Infinity}', '{"a": 1e400}', '{"a": "\\x"}', '{"a": "\\u12G4"}',
    '{"a": "\\ud800"}', '{"a": "\\udc00"}', '{"a": "\\ud800x"}', '{"a": 1, "a": 2}', "{'a': 1}", '{"a": 1}}',
    '{"a": [}', '', '   ', '{"a": "unterminated', '{"a": 1', '1' * 5000,
])
def test_canonical_json_rejects(text):
    with pytest.raises(ValueError):
        canonical_json(text)


def test_canonical_json_accepts_raw_control_characters_like_strict_false():
    text = '{"code": "line1\nline2\ttab"}'
    assert canonical_json(text) == json.dumps(json.loads(text, strict=False), ensure_ascii=False)


_json_leaf = (st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=10**30)
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
_json = st.recursive(_json_leaf,
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                     max_leaves=12)
_json_obj = st.dictionaries(st.text(max_size=8), _json, max_size=5)


def _dump(obj, rnd):
    """``obj`` as a model might write it: any of json's layouts, ASCII-escaped or not."""
    return json.dumps(obj, ensure_ascii=rnd.random() < 0.5, indent=rnd.choice([None, None, 0, 2]),
                      separators=rnd.choice([None, (",", ":"), (", ", ": "), (" ,", " : ")]))


@settings(**SETTINGS)
@given(obj=_json, seed=st.integers(0, 2**32))
def test_canonical_json_property(obj, seed):
    from pyserve.server.tool_parsers import _JsonValue
    rnd = random.Random(seed)
    text = _dump(obj, rnd)
    want = json.dumps(obj, ensure_ascii=False)
    v = _JsonValue()
    out = []
    for p in random_split(text, rnd):
        out.append(v.feed(p)[1])
    out.append(v.finish())
    assert "".join(out) == want


# ---- hermes: cases from vLLM ------------------------------------------------------------------------
# tests/entrypoints/openai/tool_parsers/test_hermes_tool_parser.py (vLLM)

def test_hermes_vllm_no_tool_call():
    text = "This is not a tool call."
    assert HERMES.extract(text) == (text, [])


def test_hermes_vllm_streaming_just_forward_text():
    text = "This is some prior text that has nothing to do with tool calling."
    for pieces in every_split(text):
        content, calls, _ = stream(HERMES, pieces)
        assert content == text and calls == []
    content, calls, _ = stream(HERMES, list(text))
    assert content == text


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "final_answer", "arguments": {"trigger": true}}\n</tool_call>',  # between tags
    '<tool_call>\n{"name": "final_answer", "arguments": {"trigger": true}}',  # until eos
])
def test_hermes_vllm_tool_call(text):
    content, calls = assert_stream_matches_extract(HERMES, text, every_split(text))
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("final_answer", '{"trigger": true}')]


def test_hermes_vllm_invalid_json():
    text = '<tool_call>\n{"name": "final_answer", "arguments": {"trigger": true}'  # missing closing brace
    assert HERMES.extract(text) == (text, [])
    for pieces in every_split(text):  # the fault shows at the end, after the call's first delta went out
        content, calls, s = stream(HERMES, pieces)
        assert s.malformed and content == ""
        assert [(n, a) for _, _, n, a in calls] == [("final_answer", '{"trigger": true}')]


def test_hermes_vllm_streaming_location():
    # vLLM streams the model's raw text ('{"location":"San ...'); we stream json.dumps's form, which is
    # also what vLLM's own non-streaming path returns.
    text = ('<tool_call>{"name": "get_current_temperature",\n"arguments": {"location":\n'
            '"San Francisco, California, United States", "unit": "celsius"}}</tool_call>')
    _, calls = assert_stream_matches_extract(HERMES, text, every_split(text))
    assert calls[0].name == "get_current_temperature"
    assert calls[0].arguments == '{"location": "San Francisco, California, United States", "unit": "celsius"}'


# vLLM's STREAM_FUNCTION_OUTPUT_SIMPLIFICATION (QwQ-32B's tokens, empty deltas included)
VLLM_QWQ_DELTAS = [
    "<tool_call>", "\n", '{"', "name", '":', ' "', "internet", "_search", '",', ' "', "arguments", '":', ' {"',
    "question", '":', ' "', "5", "MW", "燃气", "轮", "机", "设计", "参数", "", "", " 空", "气", "流量", "", "",
    " 压", "气", "机", "压", "比", "", "", " 转", "速", "", "", " 燃", "烧", "室", "出口", "温度", "", "",
    " 压", "气", "机", "级", "数", "", " 支", "点", "布局", '"}', "}\n", "</tool_call>", "",
]
VLLM_QWQ_ARGS = '{"question": "5MW燃气轮机设计参数 空气流量 压气机压比 转速 燃烧室出口温度 压气机级数 支点布局"}'
VLLM_QWQ_THINKING = ("好的，用户现在要研发一个5MW的燃气轮机，需要确定总体参数。\n\n首先，燃气轮机的功率主要由"
                     "热力学循环参数决定 (ṁa, πc ≈ log(12)/log(1.3))。\n")


def test_hermes_vllm_qwq_stream():
    content, calls, s = stream(HERMES, VLLM_QWQ_DELTAS)
    assert content == "" and not s.malformed
    assert [(n, a) for _, _, n, a in calls] == [("internet_search", VLLM_QWQ_ARGS)]
    text = "".join(VLLM_QWQ_DELTAS)
    assert_stream_matches_extract(HERMES, text, every_split(text))


def test_hermes_vllm_qwq_with_reasoning():
    # vLLM's NO_STREAM_FUNCTION_OUTPUT, its thinking shortened: "...</think>\n\n<tool_call>...</tool_call>\n\n "
    text = VLLM_QWQ_THINKING + "</think>\n\n" + "".join(VLLM_QWQ_DELTAS) + "\n\n "
    for parser in (R1, QWEN3):
        reasoning, rest = parser.split(text)
        assert reasoning == VLLM_QWQ_THINKING
        content, calls = HERMES.extract(rest)
        assert content is None and [(c.name, c.arguments) for c in calls] == [("internet_search", VLLM_QWQ_ARGS)]
    # the same through both streams, every split
    for pieces in every_split(text):
        assert chain(R1, HERMES, pieces) == (VLLM_QWQ_THINKING, "", [("internet_search", VLLM_QWQ_ARGS)])


def chain(reasoning_parser, tool_parser, pieces, **kw):
    """The server's pipeline: deltas -> reasoning stream -> its content deltas -> tool stream."""
    rs = reasoning_parser.streamer(**kw)
    ts = tool_parser.streamer()
    reasoning, deltas = [], []
    for p in pieces + [None]:
        r, c = rs.feed(p) if p is not None else rs.finish()
        reasoning.append(r or "")
        if c:
            deltas += ts.feed(c)
    deltas += ts.finish()
    content, calls = collect(deltas)
    return "".join(reasoning) or None, content, [(n, a) for _, _, n, a in calls]


def test_qwen3_tool_call_inside_thinking_every_split():
    # Qwen3.5 (<think> in the prompt) may open a <tool_call> without closing the thinking first (vLLM)
    text = ('The user wants the weather.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln"}}'
            '\n</tool_call>')
    for pieces in every_split(text):
        assert chain(QWEN3, HERMES, pieces, prompt="<|im_start|>assistant\n<think>\n") == (
            "The user wants the weather.\n", "", [("get_weather", '{"city": "Köln"}')])


# ---- hermes: ours ------------------------------------------------------------------------------------

RICH = ('Let me look that up <tool_ thing.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "São Paulo", "when": ["today", 2], "unit": "\\u00b0C", "emoji": "\\ud83c\\udf27", '
        '"n": 1.50, "big": 1E2, "ok": true, "none": null, "nested": {"a": {}}}}\n</tool_call>\n'
        '<tool_call>\n{"arguments": {"q": "你好 \\"quoted\\""}, "name": "search"}\n</tool_call>\n'
        'Anything else? </tool_call> <tool_call')


def test_hermes_content_around_and_between_calls_every_split():
    content, calls = assert_stream_matches_extract(HERMES, RICH, every_split(RICH))
    assert content == "Let me look that up <tool_ thing.\n\nAnything else? </tool_call> <tool_call"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "São Paulo", "when": ["today", 2], "unit": "°C", "emoji": "🌧", "n": 1.5,
                         "big": 100.0, "ok": True, "none": None, "nested": {"a": {}}}),
        ("search", {"q": '你好 "quoted"'}),
    ]
    assert calls[0].arguments == json.dumps(json.loads(calls[0].arguments), ensure_ascii=False)
    assert "São Paulo" in calls[0].arguments and "🌧" in calls[0].arguments  # ensure_ascii=False


def test_hermes_random_splits_into_many_pieces():
    rng = random.Random(0)
    assert_stream_matches_extract(HERMES, RICH, [random_split(RICH, rng) for _ in range(300)])
    assert_stream_matches_extract(HERMES, RICH, [list(RICH)])


def test_hermes_arguments_stream_incrementally():
    text = '<tool_call>{"name": "w", "arguments": {"text": "' + "abcdefghij" * 5 + '"}}</tool_call>'
    s = HERMES.streamer()
    frags = []
    for ch in text:
        for d in s.feed(ch):
            if "tool_calls" in d and "id" not in d["tool_calls"][0]:
                frags.append(d["tool_calls"][0]["function"]["arguments"])
    s.finish()
    assert len(frags) > 40  # one fragment per character of the string, roughly
    assert "".join(frags) == '{"text": "' + "abcdefghij" * 5 + '"}'


def test_hermes_header_waits_for_the_name_and_holds_back_partial_tags():
    s = HERMES.streamer()
    assert s.feed("Hi <tool_") == [{"content": "Hi "}]
    assert s.feed("call>\n{") == []
    assert s.feed('"name": "get_') == []  # the name is not complete
    assert s.feed('x", "arguments": ') == []  # its arguments have not begun
    d, a = s.feed("{")  # the first delta, then the first piece of the arguments
    tc = d["tool_calls"][0]
    assert tc["index"] == 0 and tc["type"] == "function" and tc["function"] == {"name": "get_x", "arguments": ""}
    assert a == {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}
    assert s.feed('"a": 1') == [{"tool_calls": [{"index": 0, "function": {"arguments": '"a": '}}]}]  # 1 may go on
    assert s.feed("}}") == [{"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}]
    assert s.feed("\n</tool_call>") == []
    assert s.finish() == []
    assert [c.name for c in s.calls] == ["get_x"] and s.calls[0].id == tc["id"]


def test_hermes_only_whitespace_content_is_none():
    text = ('\n\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\n'
            '<tool_call>{"name": "g", "arguments": {}}</tool_call>\n')
    content, calls = assert_stream_matches_extract(HERMES, text, every_split(text))
    assert content is None and [c.name for c in calls] == ["f", "g"]
    assert HERMES.extract("  \n ") == (None, [])


def test_hermes_arguments_given_as_a_json_string():
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": [1, 2]}"}</tool_call>'
    _, calls = assert_stream_matches_extract(HERMES, text, every_split(text))
    assert calls[0].arguments == '{"x": [1, 2]}'


def test_hermes_extra_keys_are_ignored():
    text = '<tool_call>{"id": 7, "name": "f", "type": "function", "arguments": {"a": [1]}, "x": -2.5e1}</tool_call>'
    _, calls = assert_stream_matches_extract(HERMES, text, every_split(text))
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"a": [1]}')]


def test_hermes_raw_newlines_in_strings_are_accepted():
    text = '<tool_call>{"name": "run", "arguments": {"code": "print(1)\nprint(2)"}}</tool_call>'
    _, calls = assert_stream_matches_extract(HERMES, text, every_split(text))
    assert json.loads(calls[0].arguments) == {"code": "print(1)\nprint(2)"}


def test_hermes_max_calls_keeps_the_first():
    text = ('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {}}'
            '</tool_call>after')
    content, calls = assert_stream_matches_extract(HERMES, text, every_split(text), max_calls=1)
    assert content == "after" and [c.name for c in calls] == ["f"]


@pytest.mark.parametrize("text", [
    "<tool_call>I will call a tool now",  # not JSON
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "f"}</tool_call>',  # no arguments
    '<tool_call>{"name": 5, "arguments": {}}</tool_call>',  # name not a string
    '<tool_call>{"name": "", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
    '<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>',
    '<tool_call>{"name": "f", "name": "g", "arguments": {}}</tool_call>',
    '<tool_call>["f", {}]</tool_call>',
    'Sure. <tool_call>{"name": "f" "arguments": {}}</tool_call>',
])
def test_hermes_malformed_before_the_first_delta_is_all_content(text):
    assert HERMES.extract(text) == (text, [])
    for pieces in every_split(text):
        content, calls, s = stream(HERMES, pieces)
        assert s.malformed and content == text and calls == [] and not s.tools_called


@pytest.mark.parametrize("text,calls_sent,content_after", [
    # the fault shows after the call's first delta went out: the call stays, the text from the fault on
    # is content (vLLM's own stream cannot take it back either)
    ('<tool_call>{"name": "f", "arguments": {"a": 1}}}</tool_call>', [("f", '{"a": 1}')], "}</tool_call>"),
    ('<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>', [("f", '{"a": ')], "}}</tool_call>"),
    ('<tool_call>{"name": "f", "arguments": {"a": "x\\qy"}}', [("f", '{"a": "x')], "qy\"}}"),
    ('<tool_call>{"name": "f", "arguments": {"a": 1, "a": 2}}', [("f", '{"a": 1, "a')], '": 2}}'),
    ('<tool_call>{"name": "f", "arguments": {}, "arguments": {}}', [("f", "{}")], '": {}}'),
    ('<tool_call>{"name": "f", "arguments": {"a": 1}}\nno end tag', [("f", '{"a": 1}')], "no end tag"),
    ('<tool_call>{"name": "f", "arguments": {"a": 1}} <tool_call>{"name": "g", "arguments": {}}</tool_call>',
     [("f", '{"a": 1}')], '<tool_call>{"name": "g", "arguments": {}}</tool_call>'),
    ('<tool_call>{"name": "f", "arguments": {"s": "cut off by max_tok', [("f", '{"s": "cut off by max_tok')], ""),
])
def test_hermes_malformed_after_the_first_delta(text, calls_sent, content_after):
    assert HERMES.extract(text) == (text, [])
    for pieces in every_split(text):
        content, calls, s = stream(HERMES, pieces)
        assert s.malformed and s.tools_called
        assert [(n, a) for _, _, n, a in calls] == calls_sent
        assert content == content_after
        assert s.calls == []


def test_hermes_end_tag_cut_off_at_the_end_is_forgiven():
    text = '<tool_call>{"name": "f", "arguments": {}}\n</tool_'
    _, calls = assert_stream_matches_extract(HERMES, text, every_split(text))
    assert [c.name for c in calls] == ["f"]


def test_stream_rejects_feed_after_finish():
    s = HERMES.streamer()
    s.finish()
    assert s.finish() == []
    with pytest.raises(RuntimeError):
        s.feed("x")


# ---- hermes: generated outputs ---------------------------------------------------------------------

_content_alphabet = st.sampled_from(list("ab <>/_tolc{}\":\n é😀")
                                   + ["<tool_", "</tool_call>", "<tool_call", "tool_call>"])
_content = st.lists(_content_alphabet, max_size=8).map("".join).filter(lambda s: "<tool_call>" not in s)
_names = st.sampled_from(["get_weather", "f", "search_web", "ünïcode_näme", 'quote"name', "a\\b", "日本"])


@st.composite
def hermes_outputs(draw):
    """(text, expected content, expected [(name, arguments)])"""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    n = draw(st.integers(0, 3))
    segments = [draw(_content) for _ in range(n + 1)]
    parts, want = [segments[0]], []
    for i in range(n):
        name, args = draw(_names), draw(_json_obj)
        name_json = json.dumps(name, ensure_ascii=rnd.random() < 0.5)
        items = [f'"name": {name_json}', f'"arguments": {_dump(args, rnd)}']
        if rnd.random() < 0.2:
            items.reverse()
        obj = "{" + rnd.choice([", ", ",", ",\n  "]).join(items) + "}"
        end = "" if (i == n - 1 and rnd.random() < 0.2 and not segments[n].strip(JWS)) else "</tool_call>"
        parts.append("<tool_call>" + rnd.choice(["", "\n", " "]) + obj + rnd.choice(["", "\n"]) + end)
        parts.append(segments[i + 1] if end else "")
        want.append((name, json.dumps(args, ensure_ascii=False)))
    # what the content should be: the text outside the calls, whitespace-only stretches after a call
    # dropped, and None when nothing but whitespace is left
    kept = [segments[0]] + [s for s in segments[1:] if s.strip(JWS)]
    content = "".join(kept)
    return "".join(parts), (content if content.strip() else None), want


@settings(**SETTINGS)
@given(case=hermes_outputs(), seed=st.integers(0, 2**32))
def test_hermes_generated_outputs_any_split(case, seed):
    text, want_content, want_calls = case
    rng = random.Random(seed)
    content, calls = assert_stream_matches_extract(
        HERMES, text, [random_split(text, rng) for _ in range(5)] + [list(text)])
    assert content == want_content
    assert [(c.name, c.arguments) for c in calls] == want_calls


@settings(**SETTINGS)
@given(case=hermes_outputs(), seed=st.integers(0, 2**32), cut=st.integers(0, 10**6), junk=st.sampled_from(
    ["", "}", "{", '"', "\\", ",", "x", "<tool_call>", "</tool_call>", "\ud800"]))
def test_hermes_broken_outputs_stream_the_same_under_any_split(case, seed, cut, junk):
    """Damaged outputs: whatever the stream makes of them does not depend on how the text was split, and
    agrees with extract() whenever the damage showed before any call went out."""
    text, _, _ = case
    k = cut % (len(text) + 1)
    text = text[:k] + junk + text[k + 1:]
    rng = random.Random(seed)
    whole = stream_result(HERMES, [text])
    for _ in range(4):
        assert stream_result(HERMES, random_split(text, rng)) == whole
    content, calls, malformed, tools_called = whole
    e_content, e_calls = HERMES.extract(text)
    if not malformed:
        assert content == (e_content or "") and calls == [(i, c.name, c.arguments) for i, c in enumerate(e_calls)]
    else:
        assert e_calls == [] and e_content == text
        if not tools_called:
            assert content == text


# ---- llama3_json: cases from vLLM -------------------------------------------------------------------
# tests/entrypoints/openai/tool_parsers/test_llama3_json_tool_parser.py (vLLM)

def test_llama_vllm_with_arguments():
    text = '{"name": "searchTool", "parameters": {"query": "test query", "limit": 10}}'
    content, calls = assert_stream_matches_extract(LLAMA, text, every_split(text))
    assert content is None and calls[0].name == "searchTool"
    assert calls[0].arguments == '{"query": "test query", "limit": 10}'


def test_llama_vllm_no_json():
    text = "This is just some text without any tool calls"
    assert LLAMA.extract(text) == (text, [])
    for pieces in every_split(text):
        assert stream(LLAMA, pieces)[:2] == (text, [])


def test_llama_vllm_invalid_json():
    text = '{"name": "invalidTool", "parameters": {invalid json}'
    assert LLAMA.extract(text) == (text, [])


def test_llama_vllm_arguments_key():
    text = '{"name": "searchTool", "arguments": {"query": "test"}}'
    _, calls = assert_stream_matches_extract(LLAMA, text, every_split(text))
    assert (calls[0].name, calls[0].arguments) == ("searchTool", '{"query": "test"}')


@pytest.mark.parametrize("sep", ["; ", " ; ", ";", ";\n"])
def test_llama_vllm_multiple_json(sep):
    text = sep.join(['{"name": "searchTool", "parameters": {"query": "test1"}}',
                     '{"name": "getOpenIncidentsTool", "parameters": {}}',
                     '{"name": "searchTool", "parameters": {"query": "test2"}}'])
    content, calls = assert_stream_matches_extract(LLAMA, text, every_split(text))
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [
        ("searchTool", '{"query": "test1"}'), ("getOpenIncidentsTool", "{}"), ("searchTool", '{"query": "test2"}')]


def test_llama_vllm_text_around_calls_differs():
    # vLLM's non-streaming path finds a JSON call in mid-text ("Here is the result: {...}") and drops the
    # text; its streaming path, like ours on both, only reads calls at the start of the reply.
    text = 'Here is the result: {"name": "getOpenIncidentsTool", "parameters": {}} Would you like to know more?'
    assert LLAMA.extract(text) == (text, [])
    text = ('{"name": "searchTool", "parameters": {"query": "test1"}}; '
            '{"name": "getOpenIncidentsTool", "parameters": {}} Would you like to know more?')
    content, calls = assert_stream_matches_extract(LLAMA, text, every_split(text))
    assert content == " Would you like to know more?" and len(calls) == 2


# ---- llama3_json: ours -------------------------------------------------------------------------------

def test_llama_python_tag_and_leading_whitespace():
    text = '\n<|python_tag|>{"name": "get_weather", "parameters": {"city": "Zürich"}}'
    content, calls = assert_stream_matches_extract(LLAMA, text, every_split(text))
    assert content is None and (calls[0].name, calls[0].arguments) == ("get_weather", '{"city": "Zürich"}')


def test_llama_python_tag_with_code_is_content():
    text = '<|python_tag|>brave_search.call(query="weather")'
    assert LLAMA.extract(text) == (text, [])
    for pieces in every_split(text):
        assert stream(LLAMA, pieces)[:2] == (text, [])


def test_llama_plain_answer_streams_without_delay():
    s = LLAMA.streamer()
    assert s.feed("  ") == []
    assert s.feed("The") == [{"content": "  The"}]
    assert s.feed(" answer {is} 42") == [{"content": " answer {is} 42"}]


@pytest.mark.parametrize("text", [
    '{"answer": 42}',  # a JSON reply, not a call: content, decided at the first key
    '{"name": "Bob", "age": 3}',
    '{"name": "Bob"}',
    '{"name": "f", "parameters": {}}; oops',
])
def test_llama_json_that_is_not_a_call_is_content(text):
    assert LLAMA.extract(text) == (text, [])
    if text.endswith("oops"):
        return  # the first call went out before the damage showed
    for pieces in every_split(text):
        content, calls, s = stream(LLAMA, pieces)
        assert content == text and calls == []


def test_llama_type_key_is_allowed():
    text = '{"type": "function", "name": "f", "parameters": {"x": 1}}'
    _, calls = assert_stream_matches_extract(LLAMA, text, every_split(text))
    assert (calls[0].name, calls[0].arguments) == ("f", '{"x": 1}')


@st.composite
def llama_outputs(draw):
    rnd = random.Random(draw(st.integers(0, 2**32)))
    n = draw(st.integers(0, 3))
    if n == 0:
        text = draw(_content)
        assume(not text.lstrip(JWS).startswith(("{", "<|python_tag|>"[:len(text.lstrip(JWS)) or 1])))
        return text, (text if text.strip() else None), []
    calls, want = [], []
    for _ in range(n):
        name, args = draw(_names), draw(_json_obj)
        key = rnd.choice(["parameters", "arguments"])
        calls.append("{" + f'"name": {json.dumps(name)}, "{key}": {_dump(args, rnd)}' + "}")
        want.append((name, json.dumps(args, ensure_ascii=False)))
    head = rnd.choice(["", "\n", "<|python_tag|>", " <|python_tag|> "])
    tail = draw(_content)
    assume(not tail.lstrip(JWS).startswith(";"))
    text = head + rnd.choice(["; ", ";", " ;\n"]).join(calls) + tail
    return text, (tail if tail.strip(JWS) and tail.strip() else None), want


@settings(**SETTINGS)
@given(case=llama_outputs(), seed=st.integers(0, 2**32))
def test_llama_generated_outputs_any_split(case, seed):
    text, want_content, want_calls = case
    rng = random.Random(seed)
    content, calls = assert_stream_matches_extract(
        LLAMA, text, [random_split(text, rng) for _ in range(5)] + [list(text)])
    assert content == want_content
    assert [(c.name, c.arguments) for c in calls] == want_calls


@settings(**SETTINGS)
@given(case=llama_outputs(), seed=st.integers(0, 2**32), cut=st.integers(0, 10**6),
       junk=st.sampled_from(["", "}", "{", '"', ";", "x", "<|python_tag|>"]))
def test_llama_broken_outputs_stream_the_same_under_any_split(case, seed, cut, junk):
    text, _, _ = case
    k = cut % (len(text) + 1)
    text = text[:k] + junk + text[k + 1:]
    rng = random.Random(seed)
    whole = stream_result(LLAMA, [text])
    for _ in range(4):
        assert stream_result(LLAMA, random_split(text, rng)) == whole
    content, calls, malformed, tools_called = whole
    e_content, e_calls = LLAMA.extract(text)
    if not malformed:
        assert content == (e_content or "") and calls == [(i, c.name, c.arguments) for i, c in enumerate(e_calls)]
    elif not tools_called:
        assert content == text and e_content == text


# ---- reasoning: cases from vLLM --------------------------------------------------------------------
# tests/reasoning/test_deepseekr1_reasoning_parser.py (vLLM); where its streaming and non-streaming
# answers differ, ours is the one both give.

R1_CASES = [
    ("This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
    ("This is a reasoning section</think>", "This is a reasoning section", None),
    ("This is content", "This is content", None),
    ("This\nThat</think>This is the rest\nThat", "This\nThat", "This is the rest\nThat"),
    ("</think>This is the rest", None, "This is the rest"),  # vLLM non-streaming: reasoning ""
    ("<think>This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
    ("<think>This is a reasoning section</think>", "This is a reasoning section", None),
    ("<think>This\nThat</think>This is the rest\nThat", "This\nThat", "This is the rest\nThat"),
    ("<think>This is a reasoning section", "This is a reasoning section", None),
    ("", None, None),
    # vLLM non-streaming drops the "\n" before <think>, its streaming keeps it as reasoning; both of ours drop it
    ("\n<think>This is a reasoning section</think>\nThis is the rest", "This is a reasoning section",
     "\nThis is the rest"),
]


@pytest.mark.parametrize("text,reasoning,content", R1_CASES)
def test_deepseek_r1_vllm_cases(text, reasoning, content):
    assert_reasoning(R1, text, reasoning, content, {})


# tests/reasoning/test_qwen3_reasoning_parser.py (vLLM): Qwen3 writing its own <think> (thinking on, the
# prompt not starting it) or nothing at all (thinking off)
QWEN3_CASES = [
    ("<think>This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
    ("This is the rest", None, "This is the rest"),
    ("<think>This is a reasoning section</think>", "This is a reasoning section", None),
    ("<think>This is a reasoning\nsection</think>This is the rest\nThat", "This is a reasoning\nsection",
     "This is the rest\nThat"),
    ("<think>This is a reasoning section", "This is a reasoning section", None),  # vLLM's streaming answer
]
# ... and the "prefix format" (Qwen3 Thinking-2507 / Qwen3.5: <think> in the prompt)
QWEN3_PREFIX_CASES = [
    ("This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
    ("This is a reasoning section</think>", "This is a reasoning section", None),
    ("This is a reasoning\nsection</think>This is the rest\nThat", "This is a reasoning\nsection",
     "This is the rest\nThat"),
    # newer vLLM: a <tool_call> in the thinking ends it, the tag going to the content
    ('I should call it.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', "I should call it.\n",
     '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'),
    ("still thinking when max_tokens hit", "still thinking when max_tokens hit", None),
]


@pytest.mark.parametrize("text,reasoning,content", QWEN3_CASES)
def test_qwen3_vllm_cases(text, reasoning, content):
    assert_reasoning(QWEN3, text, reasoning, content, {"prompt": "<|im_start|>assistant\n"})
    assert_reasoning(QWEN3, text, reasoning, content, {"start_in_reasoning": False})


@pytest.mark.parametrize("text,reasoning,content", QWEN3_PREFIX_CASES)
def test_qwen3_vllm_prefix_cases(text, reasoning, content):
    assert_reasoning(QWEN3, text, reasoning, content, {"prompt": "<|im_start|>assistant\n<think>\n"})
    assert_reasoning(QWEN3, text, reasoning, content, {})  # default: enable_thinking (True)


def test_qwen3_thinking_disabled():
    kw = {"chat_template_kwargs": {"enable_thinking": False}}
    assert QWEN3.split("The answer is 4.", **kw) == (None, "The answer is 4.")
    assert QWEN3.split("The answer is 4.") == ("The answer is 4.", None)
    prompt = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # the template's rendering with thinking off
    assert not QWEN3.prompt_starts_in_reasoning(prompt)
    assert QWEN3.split("The answer is 4.", prompt=prompt) == (None, "The answer is 4.")


def assert_reasoning(parser, text, reasoning, content, kw):
    assert parser.split(text, **kw) == (reasoning, content)
    for pieces in every_split(text):
        s = parser.streamer(**kw)
        r, c = [], []
        ended_at = None
        for k, p in enumerate(pieces + [None]):
            dr, dc = s.feed(p) if p is not None else s.finish()
            assert dr is None or dr, "empty deltas are None"
            assert dc is None or dc
            r.append(dr or "")
            c.append(dc or "")
            if dc:
                assert s.reasoning_ended, "content only once the thinking is over"
            if s.reasoning_ended and ended_at is None:
                ended_at = k
        assert ("".join(r) or None, "".join(c) or None) == (reasoning, content), pieces


def test_reasoning_holds_back_partial_end_tag():
    s = R1.streamer()
    assert s.feed("abc</thi") == ("abc", None)
    assert not s.reasoning_ended
    assert s.feed("nk>") == (None, None)
    assert s.reasoning_ended
    assert s.feed("xyz") == (None, "xyz")
    s = R1.streamer()
    assert s.feed("a</thi") == ("a", None)
    assert s.finish() == ("</thi", None)


def test_reasoning_ended_without_thinking():
    s = QWEN3.streamer(start_in_reasoning=False)
    assert s.feed("  ") == (None, None) and not s.reasoning_ended  # might still be "<think>"
    assert s.feed("Hi") == (None, "  Hi") and s.reasoning_ended


@st.composite
def reasoning_outputs(draw):
    alphabet = st.sampled_from(list("ab \n<>/thinkcol_") + ["<think>", "</think>", "<tool_call>", "</thi", "<thi"])
    return draw(st.lists(alphabet, max_size=14).map("".join))


def ref_split(text, start_in_reasoning, implicit):
    """An obvious, non-streaming statement of the rules."""
    rest = text.lstrip(JWS)
    if rest.startswith("<think>"):
        body, inside = rest[len("<think>"):], True
    else:
        body, inside = text, start_in_reasoning
    if not inside:
        return None, text or None
    ends = [(body.find(t), t) for t in ("</think>", *implicit) if t in body]
    if not ends:
        return body or None, None
    k, t = min(ends)
    return body[:k] or None, (body[k + len(t):] if t == "</think>" else body[k:]) or None


@settings(**SETTINGS)
@given(text=reasoning_outputs(), start=st.booleans(), seed=st.integers(0, 2**32))
def test_reasoning_generated_any_split(text, start, seed):
    rng = random.Random(seed)
    for parser, implicit in ((R1, ()), (QWEN3, ("<tool_call>",))):
        want = ref_split(text, start, implicit)
        assert parser.split(text, start_in_reasoning=start) == want
        for _ in range(4):
            s = parser.streamer(start_in_reasoning=start)
            r, c = [], []
            for p in random_split(text, rng):
                dr, dc = s.feed(p)
                r.append(dr or "")
                c.append(dc or "")
            dr, dc = s.finish()
            r.append(dr or "")
            c.append(dc or "")
            assert ("".join(r) or None, "".join(c) or None) == want


# ---- reasoning: tokens ------------------------------------------------------------------------------

class _FakeTokenizers:  # the tokenizers.Tokenizer interface
    vocab = {"<think>": 10, "</think>": 11, "<tool_call>": 12, "</tool_call>": 13, "a": 1, "b": 2}

    def token_to_id(self, t):
        return self.vocab.get(t)


class _FakeGGUF:  # pyserve's GGUFTokenizer wraps one as .tokenizer
    tokenizer = _FakeTokenizers()


class _FakeHF:
    def get_vocab(self):
        return dict(_FakeTokenizers.vocab)


@pytest.mark.parametrize("tok", [_FakeTokenizers(), _FakeGGUF(), _FakeHF()])
def test_find_token_id(tok):
    assert find_token_id(tok, "</think>") == 11
    assert find_token_id(tok, "</nope>") is None
    assert R1.tokens(tok).end_id == 11


def test_is_reasoning_end_tokens():
    r1 = R1.tokens(_FakeTokenizers())
    assert r1.start_id == 10 and r1.implicit_end_ids == {}
    assert not r1.is_reasoning_end([1, 10, 2])  # prompt ends in "<think>"
    assert r1.is_reasoning_end([1, 10, 2, 11])
    assert r1.is_reasoning_end([10, 11, 1, 2])  # Qwen3 with thinking off: "<think>\n\n</think>\n\n"
    assert not r1.is_reasoning_end([10, 11, 1, 10, 2])  # a new thinking began
    assert not r1.is_reasoning_end([1, 2])
    assert r1.ends_in([2, 11]) and not r1.ends_in([2, 12])
    q = QWEN3.tokens(_FakeTokenizers())
    assert q.implicit_end_ids == {12: 13}
    assert q.is_reasoning_end([10, 1, 12, 2])  # an unpaired <tool_call> ends it
    assert not q.is_reasoning_end([12, 1, 13, 10, 2])  # a paired one (a system-prompt example) does not
    assert not q.is_reasoning_end([10, 12, 1, 13, 2])
    assert q.ends_in([12])
    assert R1.tokens(object()) is None
    assert ReasoningTokens(None, 11).is_reasoning_end([11])


# ---- tool_choice: required / named ----------------------------------------------------------------
# tests/tool_use/test_tool_choice_required.py (vLLM)

EXAMPLE_TOOLS = [
    {"type": "function", "function": {
        "name": "get_current_weather", "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_forecast", "description": "Get the weather forecast for a given location",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city", "days"], "additionalProperties": False}}},
]


def validates(instance, schema, root=None) -> bool:
    """A small JSON Schema validator for the keywords these schemas use."""
    root = root if root is not None else schema
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return validates(instance, target, root)
    if "anyOf" in schema and not any(validates(instance, s, root) for s in schema["anyOf"]):
        return False
    if "enum" in schema and not any(json.dumps(instance) == json.dumps(e) for e in schema["enum"]):
        return False
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = {"object": isinstance(instance, dict), "array": isinstance(instance, list),
              "string": isinstance(instance, str), "boolean": isinstance(instance, bool), "null": instance is None,
              "integer": isinstance(instance, int) and not isinstance(instance, bool),
              "number": isinstance(instance, (int, float)) and not isinstance(instance, bool)}
        if not any(ok[t] for t in types):
            return False
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        if any(k not in instance for k in schema.get("required", [])):
            return False
        for k, v in instance.items():
            if k in props:
                if not validates(v, props[k], root):
                    return False
            elif schema.get("additionalProperties") is False:
                return False
            elif isinstance(schema.get("additionalProperties"), dict):
                if not validates(v, schema["additionalProperties"], root):
                    return False
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0) or len(instance) > schema.get("maxItems", len(instance)):
            return False
        if "items" in schema and not all(validates(v, schema["items"], root) for v in instance):
            return False
    return True


NAMED_FORECAST = {"type": "function", "function": {"name": "get_forecast"}}
VLLM_VALID_OUTPUTS = [
    [{"name": "get_current_weather", "parameters": {"city": "Vienna"}}],
    [{"name": "get_current_weather", "parameters": {"city": "Vienna"}},
     {"name": "get_current_weather", "parameters": {"city": "Berlin"}}],
    [{"name": "get_forecast", "parameters": {"city": "Vienna", "days": 7}}],
    [{"name": "get_forecast", "parameters": {"city": "Vienna", "days": 7}},
     {"name": "get_current_weather", "parameters": {"city": "Vienna"}}],
    [{"name": "get_forecast", "parameters": {"city": "Vienna", "days": 7}},
     {"name": "get_current_weather", "parameters": {"city": "Vienna"}},
     {"name": "get_forecast", "parameters": {"city": "Berlin", "days": 7}},
     {"name": "get_current_weather", "parameters": {"city": "Berlin"}}],
]
VLLM_INVALID_OUTPUTS = [
    None, [], {}, [{}],
    [{"name": "get_current_weather"}],
    [{"name": "get_current_weather", "parameters": {}}],
    [{"name": "get_current_weather", "parameters": None}],
    {"name": "get_current_weather", "parameters": {"city": "Vienna"}},
    [{"name": "get_current_weather", "parameters": {"city": "Vienna", "extra": "value"}}],
    # vLLM's "parameters first" case is about key order, which a JSON schema does not constrain
    [{"name": "get_forecast", "parameters": {"city": "Vienna"}}],
    [{"name": "get_weather", "parameters": {"city": "Vienna", "days": 7}}],
    [{"name": "get_current_weather", "parameters": {"city": "Vienna"}}, {}],
    # ours on top
    [{"name": "get_current_weather", "parameters": {"city": "Vienna"}, "extra": 1}],
    [{"name": "get_current_weather", "parameters": {"city": 5}}],
    [{"name": "get_forecast", "parameters": {"city": "Vienna", "days": "7"}}],
    [{"name": "get_forecast", "parameters": {"city": "Vienna", "days": 7.5}}],
    "get_current_weather",
]


@pytest.mark.parametrize("output", VLLM_VALID_OUTPUTS)
def test_required_schema_accepts(output):
    schema = required_schema(parse_tool_request({"tools": EXAMPLE_TOOLS}).tools)
    assert validates(output, schema)
    assert validates(output, required_schema(EXAMPLE_TOOLS, parallel_tool_calls=False)) == (len(output) == 1)


@pytest.mark.parametrize("output", VLLM_INVALID_OUTPUTS)
def test_required_schema_rejects(output):
    assert not validates(output, required_schema(EXAMPLE_TOOLS))


def test_required_schema_shape():
    schema = required_schema(EXAMPLE_TOOLS, parallel_tool_calls=False)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    alts = schema["items"]["anyOf"]
    assert [a["properties"]["name"] for a in alts] == [
        {"type": "string", "enum": ["get_current_weather"]}, {"type": "string", "enum": ["get_forecast"]}]
    assert alts[1]["properties"]["parameters"] == EXAMPLE_TOOLS[1]["function"]["parameters"]
    assert all(a["required"] == ["name", "parameters"] for a in alts)
    assert "maxItems" not in required_schema(EXAMPLE_TOOLS)


@pytest.mark.parametrize("params", [None, {}])
def test_required_schema_tool_without_parameters(params):
    # vLLM's test_structured_outputs_json_without_parameters: only {} is a valid argument object
    fn = {"name": "get_current_weather", **({} if params is None else {"parameters": params})}
    tools = [{"type": "function", "function": fn}]
    schema = required_schema(parse_tool_request({"tools": tools}).tools)
    assert validates([{"name": "get_current_weather", "parameters": {}}], schema)
    for bad in (None, [], {}, [{}], [{"name": "get_current_weather"}],
                [{"name": "get_current_weather", "parameters": None}],
                [{"name": "get_current_weather", "parameters": {"extra": "value"}}]):
        assert not validates(bad, schema), bad
    assert parse_tool_request({"tools": tools, "tool_choice": {"type": "function", "function": {
        "name": "get_current_weather"}}}).json_schema() == EMPTY_PARAMETERS


def test_required_schema_moves_defs_to_the_top():
    unit = {"type": "string", "enum": ["C", "F"]}
    tools = [{"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"u": {"$ref": "#/$defs/Unit"}}, "required": ["u"],
        "$defs": {"Unit": unit}}}},
        {"type": "function", "function": {"name": "b", "parameters": {
            "type": "object", "properties": {"u": {"$ref": "#/$defs/Unit"}}, "$defs": {"Unit": unit}}}}]
    before = json.dumps(tools)
    schema = required_schema(tools)
    assert json.dumps(tools) == before, "the request's tools are not changed"
    assert schema["$defs"] == {"Unit": unit}
    assert validates([{"name": "a", "parameters": {"u": "C"}}], schema)
    assert not validates([{"name": "a", "parameters": {"u": "K"}}], schema)
    tools[1]["function"]["parameters"]["$defs"]["Unit"] = {"type": "integer"}
    with pytest.raises(APIError) as e:
        required_schema(tools)
    assert e.value.status == 400 and e.value.param == "tools[1].function.parameters"


def test_named_schema_is_the_parameters():
    req = parse_tool_request({"tools": EXAMPLE_TOOLS, "tool_choice": NAMED_FORECAST})
    schema = req.json_schema()
    assert schema == EXAMPLE_TOOLS[1]["function"]["parameters"]
    assert validates({"city": "Vienna", "days": 3}, schema)
    for bad in ({}, {"city": "Vienna"}, {"city": "Vienna", "days": 3, "x": 1}, {"city": 1, "days": 3}, [], "x"):
        assert not validates(bad, schema), bad


@pytest.mark.parametrize("output", VLLM_VALID_OUTPUTS)
def test_required_output_to_calls_every_split(output):
    # vLLM's test_streaming_output_valid, at every split instead of fixed delta lengths
    text = json.dumps(output)
    content, calls = RequiredToolParser().extract(text)
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [(o["name"], json.dumps(o["parameters"], ensure_ascii=False))
                                                      for o in output]
    for pieces in every_split(text):
        s_content, s_calls, s = stream(RequiredToolParser(), pieces)
        assert s_content == "" and not s.malformed
        assert [(n, a) for _, _, n, a in s_calls] == [(c.name, c.arguments) for c in calls]
    one = RequiredToolParser().extract(text, max_calls=1)[1]
    assert [c.name for c in one] == [output[0]["name"]]


def test_required_output_trailing_text_and_truncation():
    text = json.dumps([{"name": "get_current_weather", "parameters": {"city": "Vienna"}}])
    # vLLM's test_streaming_output_valid_with_trailing_extra_data
    assert [c.name for c in RequiredToolParser().extract(text + "\nDONE")[1]] == ["get_current_weather"]
    assert RequiredToolParser().extract(text[:-3]) == (None, [])  # cut off: no calls (vLLM)
    _, calls, s = stream(RequiredToolParser(), [text[:-3]])
    assert s.malformed and [n for _, _, n, _ in calls] == ["get_current_weather"]
    assert RequiredToolParser().extract("[]") == (None, [])
    assert RequiredToolParser().extract('{"name": "x"}') == (None, [])


def test_named_output_to_call():
    text = '{"city": "Vienna", "days": 3}'
    p = NamedToolParser("get_forecast")
    content, (call,) = p.extract(text)
    assert content is None and (call.name, call.arguments) == ("get_forecast", text)
    for pieces in every_split(text):
        s_content, s_calls, _ = stream(p, pieces)
        assert s_content == "" and [(n, a) for _, _, n, a in s_calls] == [("get_forecast", text)]
    assert stream(p, [])[1][0][2:] == ("get_forecast", "")


# ---- tool request validation --------------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": []}, "tools"),
    ({"tools": [1]}, "tools[0]"),
    ({"tools": [EXAMPLE_TOOLS[0], {"type": "custom", "custom": {"name": "x"}}]}, "tools[1].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": "f"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": 5}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 5}}]}, "tools[0].function.description"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, "tools[0].function.strict"),
    ({"tools": EXAMPLE_TOOLS, "tool_choice": "any"}, "tool_choice"),
    ({"tools": EXAMPLE_TOOLS, "tool_choice": 5}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_forecast"}}}, "tool_choice"),
    ({"tools": EXAMPLE_TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": EXAMPLE_TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tools": EXAMPLE_TOOLS, "tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name"),
    ({"tools": EXAMPLE_TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice.type"),
    ({"tools": EXAMPLE_TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_tool_request_errors_name_the_param(body, param):
    with pytest.raises(APIError) as e:
        parse_tool_request(body)
    assert e.value.status == 400 and e.value.param == param and e.value.type == "invalid_request_error"
    assert e.value.body()["error"]["param"] == param


def test_tool_request_defaults_and_parsers():
    assert parse_tool_request({}) is None
    assert parse_tool_request({"tool_choice": "none"}) is None
    req = parse_tool_request({"tools": EXAMPLE_TOOLS})
    assert (req.tool_choice, req.parallel_tool_calls, req.max_calls) == ("auto", True, None)
    assert req.json_schema() is None
    assert req.output_parser("hermes") is HERMES
    with pytest.raises(APIError) as e:
        req.output_parser(None)
    assert e.value.param == "tool_choice"
    assert req.finish_reason("stop", True) == "tool_calls" and req.finish_reason("length", False) == "length"

    tools = [{"function": {"name": "f"}}]  # "type" may be left out (vLLM)
    none = parse_tool_request({"tools": tools, "tool_choice": "none"})
    assert none.tool_choice == "none" and none.output_parser(None) is None and none.json_schema() is None
    assert none.template_tools == [{"type": "function", "function": {"name": "f"}}]
    assert tools == [{"function": {"name": "f"}}], "the request is not changed"

    req = parse_tool_request({"tools": EXAMPLE_TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    assert req.max_calls == 1 and req.json_schema()["maxItems"] == 1
    assert isinstance(req.output_parser(None), RequiredToolParser)
    assert req.finish_reason("stop", True) == "tool_calls" and req.finish_reason("length", True) == "length"
    assert req.template_tools == EXAMPLE_TOOLS and req.template_tools is not req.tools

    req = parse_tool_request({"tools": EXAMPLE_TOOLS, "tool_choice": NAMED_FORECAST})
    assert (req.tool_choice, req.function_name) == ("function", "get_forecast")
    p = req.output_parser(None)
    assert isinstance(p, NamedToolParser) and p.name == "get_forecast"
    assert req.finish_reason("stop", True) == "tool_calls" and req.finish_reason("length", True) == "length"
