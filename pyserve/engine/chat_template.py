"""Render a tokenizer's Jinja chat template exactly as transformers' `apply_chat_template` does.

transformers is not imported (it takes seconds); what its renderer does is written out here
(transformers/utils/chat_template_utils.py, `_compile_jinja_template` and `render_jinja_template`,
and `apply_chat_template` in tokenization_utils_base.py) and checked against it by
tests/engine/test_chat_template_transformers.py on the real templates that ship with llama.cpp:

- the environment: `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
  `loopcontrols` extension and a `{% generation %}...{% endgeneration %}` tag that renders its body
  (transformers uses it to find the assistant's tokens; for a prompt it is a plain block);
- `tojson` is `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
  unlike jinja2's own filter it does not HTML-escape `<>&'` nor sort keys, and takes those args;
- the globals `raise_exception`, `strftime_now`, a `dict` without its class attributes and a
  `namespace` that refuses underscore-prefixed attributes;
- the inputs: keys whose value is None are dropped from each message, everything the template sees
  is rebuilt from plain JSON types, a message's reasoning is also given as `reasoning_content` and
  `thinking`, and `tools` and `documents` are always defined (None when not given).

`messages_for_template` turns OpenAI-shaped messages into what templates expect, as vLLM does
before it calls `apply_chat_template` (tool-call arguments parsed from their JSON string, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import sys
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    pass


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks the assistant's part; renders its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


def _raise_exception(message):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in a template, without the class's attributes (`dict.__subclasses__`, ...)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` in a template; refuses underscore-prefixed attributes (a way into CPython's internals)."""

    def __init__(*args, **kwargs):  # jinja's signature trick, so that namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute.")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENV = _environment()


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    return _ENV.from_string(template)


def _plain(value: Any) -> Any:
    """A copy of `value` built from plain JSON types (transformers' `_plain_template_data`): the
    sandbox does not know which methods of other objects are dangerous, so those become a
    placeholder naming their type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) can carry extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    np = sys.modules.get("numpy")  # a numpy scalar can only exist if numpy was imported
    if np is not None and isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


# Names a message's reasoning is given under; templates read the first (gpt-oss's read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None, **extra) -> str:
    """The prompt `template` makes of `messages` (template-shaped: see `messages_for_template`).

    `tools` are OpenAI tool dicts ({"type": "function", "function": {...}}), given to the template
    as they are; `extra` (bos_token, eos_token, documents, the request's chat_template_kwargs, ...)
    are template variables. Raises ChatTemplateError for a missing template, bad inputs, and any
    error the template raises (`raise_exception`, undefined values, ...)."""
    if not template:
        raise ChatTemplateError("the model has no chat template; pass one explicitly")
    if not messages:
        raise ChatTemplateError("cannot apply the chat template to an empty conversation")
    documents = extra.pop("documents", None)
    if tools is not None:
        if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
            raise ChatTemplateError("tools must be a list of JSON schema objects")
        tools = _plain(tools)
    if documents is not None:
        if not isinstance(documents, (list, tuple)) or not all(isinstance(d, dict) for d in documents):
            raise ChatTemplateError("documents must be a list of objects with 'title' and 'text' keys")
        documents = _plain(documents)
    chat = []
    for m in messages:
        if not isinstance(m, dict):
            raise ChatTemplateError(f"chat messages must be objects, got {m!r}")
        # Drop the keys whose value is None (OpenAI's content=None, tool_calls=None): many templates
        # test whether a key is defined, and crash or print "None" on a None.
        chat.append(_alias_reasoning(_plain({k: v for k, v in m.items() if v is not None})))
    extra = _plain(extra)
    try:
        compiled = _compile(template)
        return compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **extra)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except Exception as e:  # raised by a Python operation the template applies to its data (None + "", ...)
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def _parse_arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:  # empty, blank or malformed: vLLM gives an empty object
            return {}
    return arguments if isinstance(arguments, (dict, list)) else {}


def _text(content: Any) -> str:
    """A message's content as one string: None is "" and text parts are joined with newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text", "refusal"):
                text = part.get("refusal" if part.get("type") == "refusal" else "text")
                if text is not None:
                    texts.append(text)
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatTemplateError(f"only text content parts are supported, got {kind!r}")
        return "\n".join(texts)
    raise ChatTemplateError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def messages_for_template(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as chat templates expect them, the way vLLM prepares them for
    `apply_chat_template` (vllm/entrypoints/chat_utils.py, `_parse_chat_message_content` and
    `_postprocess_messages`), for text-only content:

    - `content` becomes a string: None is "" and a list of text parts is joined with "\\n";
    - an assistant's `tool_calls` are kept (an empty list is dropped, so that templates take the
      plain assistant path) and each `function.arguments` JSON string is parsed into the object
      templates iterate over (`arguments|items`, `arguments|tojson`); a string that is not JSON
      becomes {}; its `reasoning` (or the older `reasoning_content`) is given as both;
    - a tool message keeps `tool_call_id`; any message keeps a string `name`;
    - other keys are dropped. The caller's messages are not modified."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise ChatTemplateError(f"chat messages must be objects, got {m!r}")
        role = m.get("role")
        msg: dict[str, Any] = {"role": role, "content": _text(m.get("content"))}
        if role == "assistant":
            tool_calls = m.get("tool_calls")
            if isinstance(tool_calls, list) and tool_calls:
                calls = copy.deepcopy(tool_calls)
                for call in calls:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        fn["arguments"] = _parse_arguments(fn.get("arguments"))
                msg["tool_calls"] = calls
            elif tool_calls is not None and not isinstance(tool_calls, list):
                msg["tool_calls"] = copy.deepcopy(tool_calls)
            reasoning = m.get("reasoning")
            if reasoning is None:
                reasoning = m.get("reasoning_content")
            if reasoning is not None:
                msg["reasoning"] = reasoning
                msg["reasoning_content"] = reasoning
        elif role == "tool" and "tool_call_id" in m:
            msg["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if role == "developer" and m.get("tools") is not None:
            msg["tools"] = copy.deepcopy(m["tools"])
        out.append(msg)
    return out
