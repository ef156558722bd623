"""The request side of tool calling: the ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` fields
validated (a 400 naming the offending param), the JSON schema that constrains the output when a call is
forced, the parser that turns the output into calls, and the ``tools`` handed to the chat template.

* ``tool_choice="auto"`` (the default with tools): no constraint; the model's text goes through the
  ``--tool-call-parser`` (tool_parsers.TOOL_PARSERS).
* ``"required"``: the output is constrained to vLLM's schema, a JSON array of ``{"name": <one tool's name>,
  "parameters": <that tool's parameters>}``, at least one item (exactly one when
  ``parallel_tool_calls`` is false); parsed by ``RequiredToolParser``.
* ``{"type": "function", "function": {"name": N}}``: the output is constrained to N's ``parameters``
  schema and is the call's arguments (vLLM); parsed by ``NamedToolParser``.
* ``"none"``: no calls; the tools still go to the template (vLLM's default).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pyserve.server.errors import APIError
from pyserve.server.tool_parsers import NamedToolParser, RequiredToolParser, ToolParser, get_tool_parser

__all__ = ["ToolRequest", "parse_tool_request", "required_schema", "named_schema", "EMPTY_PARAMETERS"]

# A tool without "parameters" takes none: only {} (vLLM writes {"type": "object", "properties": {}}, which
# its outlines backend reads as "only {}", but a JSON-schema validator would let any object through).
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_DEFS_KEYS = ("$defs", "definitions")  # where "#/$defs/X" / "#/definitions/X" references point


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param)


def _validate_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise _bad(f"tools must be an array of tool objects, got {type(tools).__name__}", "tools")
    if not tools:
        raise _bad("tools must not be an empty array; give at least one tool or leave it out", "tools")
    out = []
    for i, tool in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"{p} must be an object, got {type(tool).__name__}", p)
        kind = tool.get("type", "function")  # vLLM defaults a missing type to "function"
        if kind != "function":
            raise _bad(f"{p}.type must be 'function', got {kind!r}", f"{p}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{p}.function must be an object with the function's name, description and "
                       f"parameters", f"{p}.function")
        name = fn.get("name")
        if name is None:
            raise _bad(f"{p}.function.name is missing", f"{p}.function.name")
        if not isinstance(name, str) or not name:
            raise _bad(f"{p}.function.name must be a non-empty string, got {name!r}", f"{p}.function.name")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise _bad(f"{p}.function.description must be a string", f"{p}.function.description")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _bad(f"{p}.function.parameters must be a JSON schema object, got {type(params).__name__}",
                       f"{p}.function.parameters")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _bad(f"{p}.function.strict must be a boolean", f"{p}.function.strict")
        tool = copy.deepcopy(tool)
        tool["type"] = "function"
        out.append(tool)
    return out


def _parameters(tool: dict) -> dict:
    params = tool["function"].get("parameters")
    return copy.deepcopy(params if params else EMPTY_PARAMETERS)


def required_schema(tools: list[dict], parallel_tool_calls: bool = True) -> dict:
    """vLLM's schema for tool_choice="required": ``[{"name": ..., "parameters": ...}, ...]``, one
    alternative per tool (name fixed by an enum), ``minItems`` 1, ``maxItems`` 1 without parallel calls.
    Each tool's ``$defs`` move to the top, where its ``#/$defs/...`` references now point. ``tools`` must
    be validated (``parse_tool_request``)."""
    alternatives = []
    defs: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        params = _parameters(tool)
        for key in _DEFS_KEYS:
            for def_name, def_schema in (params.pop(key, None) or {}).items():
                full = f"{key}/{def_name}"
                if full in defs and defs[full] != def_schema:
                    raise _bad(f"tools[{i}].function.parameters: the definition {key}.{def_name} differs from "
                               f"another tool's of the same name, which tool_choice='required' cannot combine",
                               f"tools[{i}].function.parameters")
                defs[full] = def_schema
        alternatives.append({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                           "parameters": params},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": alternatives}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    for full, def_schema in defs.items():
        key, def_name = full.split("/", 1)
        schema.setdefault(key, {})[def_name] = def_schema
    return schema


def named_schema(tools: list[dict], name: str) -> dict:
    """The schema for a named tool_choice: the function's ``parameters`` (an empty object schema when it
    has none); the output is the call's arguments."""
    for tool in tools:
        if tool["function"]["name"] == name:
            return _parameters(tool)
    raise _bad(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")


@dataclass
class ToolRequest:
    tools: list[dict] | None  # validated, as the client sent them (with "type": "function")
    tool_choice: str  # "none" | "auto" | "required" | "function" (a named function)
    function_name: str | None = None  # when tool_choice == "function"
    parallel_tool_calls: bool = True

    @property
    def template_tools(self) -> list[dict] | None:
        """The ``tools`` argument of the chat template (transformers' convention: the OpenAI dicts).
        Given for tool_choice="none" too, as vLLM does by default."""
        return copy.deepcopy(self.tools) if self.tools else None

    @property
    def max_calls(self) -> int | None:
        """1 when parallel_tool_calls is false (vLLM keeps only the first call), else None."""
        return None if self.parallel_tool_calls else 1

    def json_schema(self) -> dict | None:
        """The schema that must constrain the output (after any thinking), or None."""
        if self.tool_choice == "required":
            return required_schema(self.tools, self.parallel_tool_calls)
        if self.tool_choice == "function":
            return named_schema(self.tools, self.function_name)
        return None

    def output_parser(self, auto_parser: str | None) -> ToolParser | None:
        """What turns the output into calls: None for "none"; for "auto" the server's
        ``--tool-call-parser`` (a 400 when it has none, as vLLM)."""
        if self.tool_choice == "required":
            return RequiredToolParser()
        if self.tool_choice == "function":
            return NamedToolParser(self.function_name)
        if self.tool_choice == "auto":
            if not auto_parser:
                raise _bad('tool_choice "auto" needs the server to run with --tool-call-parser '
                           "(set tool_choice to \"none\", \"required\" or a named function, or leave out tools)",
                           "tool_choice")
            return get_tool_parser(auto_parser)
        return None

    def finish_reason(self, engine_reason: str | None, tools_called: bool) -> str | None:
        """"tool_calls" when calls were made: in auto mode whenever (vLLM), for a required or named call
        when it ended normally (a call cut off by max_tokens stays "length")."""
        if tools_called and (self.tool_choice == "auto" or engine_reason == "stop"):
            return "tool_calls"
        return engine_reason


def parse_tool_request(body: dict) -> ToolRequest | None:
    """Validates ``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request (APIError 400
    naming the param). None when the request has no tools (and tool_choice is absent or "none")."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad(f"parallel_tool_calls must be a boolean, got {parallel!r}", "parallel_tool_calls")
    parallel = True if parallel is None else parallel
    validated = _validate_tools(tools) if tools is not None else None

    if choice is None:
        choice = "auto" if validated else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad(f"tool_choice must be 'none', 'auto', 'required' or "
                       f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {choice!r}", "tool_choice")
        if choice != "none" and not validated:
            raise _bad(f"tool_choice {choice!r} needs tools", "tool_choice")
        if validated is None:
            return None
        return ToolRequest(validated, choice, None, parallel)
    if not isinstance(choice, dict):
        raise _bad(f"tool_choice must be a string or an object, got {type(choice).__name__}", "tool_choice")
    kind = choice.get("type", "function")
    if kind != "function":
        raise _bad(f"tool_choice.type must be 'function', got {kind!r}", "tool_choice.type")
    fn = choice.get("function")
    if not isinstance(fn, dict):
        raise _bad('tool_choice.function must be an object: {"type": "function", "function": {"name": ...}}',
                   "tool_choice.function")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"tool_choice.function.name must be a non-empty string, got {name!r}",
                   "tool_choice.function.name")
    if not validated:
        raise _bad("tool_choice names a function but tools is not set", "tool_choice")
    if not any(t["function"]["name"] == name for t in validated):
        raise _bad(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
    return ToolRequest(validated, "function", name, parallel)
