"""pyserve's chat template renderer against transformers' own, on real templates.

The templates are the ones llama.cpp tests its renderer with (models/templates/*.jinja in the
pinned llama.cpp, copied from models' tokenizer configs: Llama 3.x, Qwen2.5/3, QwQ, DeepSeek,
Mistral, Hermes, Granite, GLM, Kimi, gpt-oss, ...). Each renders a plain chat, a system prompt, a
multi-turn chat and an assistant tool call followed by its result, with and without `tools`, with
and without the generation prompt: pyserve's `render_chat` must give exactly what a tokenizer's
`apply_chat_template` gives (the reference, with the model's bos/eos tokens), or fail where it
fails. Both get the messages `messages_for_template` makes of the OpenAI-shaped ones, as a server
would.
"""

from __future__ import annotations

import datetime

import pytest

from pyserve.engine import chat_template as ct
from pyserve.engine.chat_template import ChatTemplateError, messages_for_template, render_chat
from tests import llamacpp

ctu = pytest.importorskip("transformers.utils.chat_template_utils")
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

TEMPLATES = llamacpp.chat_templates()

# Strings with what jinja2's own tojson would escape (<>&'), quotes, and non-ASCII text.
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city <e.g. \"Paris\"> & 'Zürich'",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "description": "The city's name, e.g. Köln"},
                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
CHATS = {
    "plain": [{"role": "user", "content": "Hello! What's 2 + 2?"}],
    "system": [SYSTEM, {"role": "user", "content": "Write a haiku about <tags> & \"quotes\" in Zürich."}],
    "multi_turn": [
        {"role": "user", "content": "Hi, who are you?"},
        {"role": "assistant", "content": "I'm an assistant. How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "tool_result": [
        SYSTEM,
        {"role": "user", "content": "What's the weather in Zürich?"},
        # An OpenAI client sends the arguments as a JSON string and content null; 9 characters,
        # as Mistral's templates require of an id.
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call12345", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
         "content": "{\"temperature\": 21, \"condition\": \"sunny <warm> & dry\"}"},
    ],
}
CASES = [(chat, tools, gen) for chat in CHATS for tools in (False, True) for gen in (True, False)]

# The bos/eos tokens of the models the templates come from (first matching name part wins); a
# model without a bos token (Qwen, GLM) has none: the template sees bos_token undefined.
_SPECIAL_TOKENS = [
    ("R1-Distill-Llama", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("Hermes", "<|begin_of_text|>", "<|im_end|>"),
    ("Llama-3", "<|begin_of_text|>", "<|eot_id|>"),
    ("llama-3", "<|begin_of_text|>", "<|eot_id|>"),
    ("functionary", "<|begin_of_text|>", "<|eot_id|>"),
    ("deepseek", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("DeepSeek", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("Qwen", None, "<|im_end|>"),
    ("QwQ", None, "<|im_end|>"),
    ("MiMo", None, "<|im_end|>"),
    ("SmolLM3", None, "<|im_end|>"),
    ("GLM", None, "<|endoftext|>"),
    ("gemma", "<bos>", "<eos>"),
    ("Phi-3", "<s>", "<|endoftext|>"),
    ("granite", "<|end_of_text|>", "<|end_of_text|>"),
    ("Cohere", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    ("gpt-oss", "<|startoftext|>", "<|return|>"),
    ("Kimi", "[BOS]", "[EOS]"),
    ("LFM2", "<|startoftext|>", "<|im_end|>"),
    ("Bielik", "<s>", "<|im_end|>"),
]


def special_tokens(name: str) -> dict[str, str]:
    bos, eos = next(((b, e) for part, b, e in _SPECIAL_TOKENS if part in name), ("<s>", "</s>"))
    return {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}


def reference_tokenizer(tokens: dict[str, str]) -> PreTrainedTokenizerFast:
    """A tokenizer with only these special tokens, for its apply_chat_template."""
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*tokens.values(), "<unk>"]))}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   **tokens)


FIXED_NOW = datetime.datetime(2025, 3, 14, 15, 9, 26)


class _FixedDatetime(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return FIXED_NOW


@pytest.fixture(autouse=True)
def fixed_now(monkeypatch):
    """Templates that print today's date (strftime_now) print the same one in both renderers."""
    monkeypatch.setattr(ctu, "datetime", _FixedDatetime)
    monkeypatch.setitem(ct._ENV.globals, "strftime_now", lambda fmt: FIXED_NOW.strftime(fmt))


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - a template's error is an outcome to compare
        return "error", e


def compare(template: str, name: str, render=render_chat) -> list[str]:
    """What differs between `render` and transformers over CASES (one line per case)."""
    tokens = special_tokens(name)
    tok = reference_tokenizer(tokens)
    diffs = []
    for chat, with_tools, gen in CASES:
        messages = messages_for_template(CHATS[chat])
        tools = TOOLS if with_tools else None
        case = f"{chat} tools={with_tools} add_generation_prompt={gen}"
        want = _outcome(lambda: tok.apply_chat_template(messages, tools=tools, chat_template=template,
                                                        add_generation_prompt=gen, tokenize=False))
        got = _outcome(lambda: render(template, messages, gen, tools=tools, **tokens))
        if want[0] == "ok" and got[0] == "ok":
            if want[1] != got[1]:
                at = next((i for i, (a, b) in enumerate(zip(want[1], got[1])) if a != b),
                          min(len(want[1]), len(got[1])))
                diffs.append(f"{case}: output differs at {at}: transformers {want[1][at - 40:at + 80]!r}, "
                             f"pyserve {got[1][at - 40:at + 80]!r}")
        elif want[0] == "error" and got[0] == "error":
            if not isinstance(got[1], ChatTemplateError) or str(want[1]) not in str(got[1]):
                diffs.append(f"{case}: transformers raised {want[1]!r}, pyserve raised {got[1]!r}")
        elif want[0] == "error":
            diffs.append(f"{case}: transformers raised {want[1]!r}, pyserve rendered")
        else:
            diffs.append(f"{case}: pyserve raised {got[1]!r}, transformers rendered")
    return diffs


def test_templates_found():
    assert len(TEMPLATES) >= 60, f"expected llama.cpp's chat templates, found {len(TEMPLATES)}"


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_renders_as_transformers(path):
    diffs = compare(path.read_text(encoding="utf-8"), path.stem)
    assert not diffs, "\n".join(diffs)


def test_dates_are_fixed():
    """Both renderers print the fixed date (the comparison cannot depend on the day it runs)."""
    path = next(p for p in TEMPLATES if p.stem == "meta-llama-Llama-3.2-3B-Instruct")
    template, messages, tokens = path.read_text(encoding="utf-8"), CHATS["plain"], special_tokens(path.stem)
    want = reference_tokenizer(tokens).apply_chat_template(messages, chat_template=template, tokenize=False)
    assert "14 Mar 2025" in want and "14 Mar 2025" in render_chat(template, messages, **tokens)


def test_some_templates_render_tools():
    """The comparison means something: most templates render (not raise) a tool call and its
    result, and show the parsed arguments."""
    rendered = 0
    for path in TEMPLATES:
        try:
            text = render_chat(path.read_text(encoding="utf-8"), messages_for_template(CHATS["tool_result"]),
                               tools=TOOLS, **special_tokens(path.stem))
        except ChatTemplateError:
            continue
        rendered += "Zürich" in text and "21" in text
    assert rendered >= len(TEMPLATES) * 3 // 4


# -- render_chat's own behaviour, which the real templates may not reach --

def test_tojson_like_transformers():
    tpl = "{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ x|tojson(ensure_ascii=True) }}|{{ x|tojson(sort_keys=True) }}"
    x = {"b": "<a & 'b'> \"Zürich\"", "a": [1, 2.5, None, True]}
    tok = reference_tokenizer({})
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(tpl, messages, x=x) == tok.apply_chat_template(messages, chat_template=tpl, tokenize=False, x=x)
    want = '{"b": "<a & \'b\'> \\"Zürich\\"", "a": [1, 2.5, null, true]}'  # not HTML-escaped, keys unsorted
    assert render_chat("{{ x|tojson }}", messages, x=x) == want


def test_generation_tag_renders_its_body():
    tpl = "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    assert render_chat(tpl, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "[a][b]"


def test_inputs_like_transformers():
    """None keys are dropped, reasoning is aliased, tools and documents are defined (None) when
    not given, and extra keyword arguments are template variables."""
    tpl = ("{{ messages|tojson }}|{{ tools is defined }} {{ tools is none }}|{{ documents is defined }}|"
           "{{ documents|tojson }}|{{ enable_thinking }}")
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "reasoning": "think", "tool_calls": None}]
    docs = [{"title": "T", "text": "x"}]
    want = reference_tokenizer({}).apply_chat_template(messages, chat_template=tpl, tokenize=False,
                                                       documents=docs, enable_thinking=False)
    assert render_chat(tpl, messages, False, documents=docs, enable_thinking=False) == want
    assert '"thinking": "think"' in want and '"reasoning_content": "think"' in want and "None" not in want
    assert messages[1]["content"] is None  # the caller's messages are left alone


def test_errors():
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(None, messages)
    with pytest.raises(ChatTemplateError, match="boom"):
        render_chat("{{ raise_exception('boom') }}", messages)
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages[0].nothing.deeper }}", messages)
    with pytest.raises(ChatTemplateError):
        render_chat("{{ 1 + none }}", messages)
    with pytest.raises(ChatTemplateError):
        render_chat("{% if %}", messages)
    with pytest.raises(ChatTemplateError):  # the sandbox
        render_chat("{{ ''.__class__.__mro__ }}{{ dict.__class__.__subclasses__() }}", messages)
    with pytest.raises(ChatTemplateError):
        render_chat("{% set ns = namespace(_x=1) %}", messages)
    assert render_chat("{% set ns = namespace(x=1) %}{% set ns.y = 2 %}{{ ns.x + ns.y }}{{ dict(a=1)|tojson }}",
                       messages) == '3{"a": 1}'


def test_messages_for_template():
    openai = [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "hi", "name": "bob", "extra": 1},
        {"role": "assistant", "content": None, "reasoning_content": "hmm", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": [1, 2]}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
            {"id": "c3", "type": "function", "function": {"name": "h", "arguments": {"y": 1}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "assistant", "content": "done", "tool_calls": []},
    ]
    assert messages_for_template(openai) == [
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": "hi", "name": "bob"},
        {"role": "assistant", "content": "", "reasoning": "hmm", "reasoning_content": "hmm", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": [1, 2]}}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {}}},
            {"id": "c3", "type": "function", "function": {"name": "h", "arguments": {"y": 1}}}]},
        {"role": "tool", "content": "3", "tool_call_id": "c1"},
        {"role": "assistant", "content": "done"},
    ]
    assert openai[2]["tool_calls"][0]["function"]["arguments"] == "{\"x\": [1, 2]}"  # not modified
    with pytest.raises(ChatTemplateError, match="image_url"):
        messages_for_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
