"""The request fields that constrain output to a grammar, mapped onto one GrammarSpec: OpenAI's
`response_format` (`text`, `json_object`, `json_schema`), vLLM's `structured_outputs` object (`json`,
`regex`, `choice`, `grammar`, `json_object`) and its older `guided_*` fields. At most one may
constrain a request. Whether the schema, regex or grammar compiles is the backend's to say."""

from __future__ import annotations

from typing import Any

from pyserve.server.errors import APIError
from pyserve.structured.spec import GrammarError, GrammarSpec

_STRUCTURED_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                     "json_object": "json_object"}
# vLLM's structured_outputs options besides the grammar: disable_any_whitespace is applied; the others
# change nothing here (or only name a backend).
_STRUCTURED_HARMLESS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                        "whitespace_pattern", "backend", "structural_tag", "_backend", "_backend_was_auto")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _response_format(rf: Any) -> GrammarSpec | None:
    param = "response_format"
    if not isinstance(rf, dict):
        raise APIError(400, "response_format must be an object with a `type`", param=param)
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object(param)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise APIError(400, "response_format.json_schema must be an object with `name` and `schema`",
                           param=param)
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise APIError(400, "response_format.json_schema.name must be a string", param=param)
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise APIError(400, "response_format.json_schema.strict must be a boolean", param=param)
        schema = js.get("schema")
        if schema is None:  # OpenAI allows it absent: any JSON object
            return GrammarSpec.json_object(param)
        return GrammarSpec.json_schema(schema, param)
    raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                   param=param)


def _structured_outputs(so: Any) -> GrammarSpec | None:
    if not isinstance(so, dict):
        raise APIError(400, "structured_outputs must be an object", param="structured_outputs")
    given = [k for k in _STRUCTURED_KINDS if so.get(k) not in (None, False)]
    unknown = [k for k in so if k not in _STRUCTURED_KINDS and k not in _STRUCTURED_HARMLESS]
    if unknown:
        raise APIError(400, f"structured_outputs.{unknown[0]} is not supported by this server",
                       param="structured_outputs")
    if so.get("structural_tag") is not None:
        raise APIError(400, "structured_outputs.structural_tag is not supported by this server",
                       param="structured_outputs")
    if len(given) > 1:
        raise APIError(400, f"structured_outputs takes one of json, regex, choice, grammar or json_object; "
                            f"got {', '.join(given)}", param="structured_outputs")
    if not given:
        return None
    key = given[0]
    flexible = so.get("disable_any_whitespace") is not True
    return _one(key, so[key], f"structured_outputs.{key}", flexible)


def _one(key: str, value: Any, param: str, flexible_whitespace: bool = True) -> GrammarSpec:
    if key == "json":
        return GrammarSpec.json_schema(value, param, flexible_whitespace)
    if key == "json_object":
        if value is not True:
            raise APIError(400, f"{param} must be true", param=param)
        return GrammarSpec.json_object(param, flexible_whitespace)
    if key == "choice":
        return GrammarSpec.choice(value, param)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{param} must be a non-empty string", param=param)
    return GrammarSpec.regex(value, param) if key == "regex" else GrammarSpec.grammar(value, param)


def grammar_spec(body: dict) -> GrammarSpec | None:
    """The one grammar a request's body asks for, or None."""
    try:
        return _grammar_spec(body)
    except GrammarError as e:
        raise APIError(400, str(e), param=e.param) from None


def _grammar_spec(body: dict) -> GrammarSpec | None:
    found: list[tuple[str, GrammarSpec]] = []
    if body.get("response_format") is not None:
        spec = _response_format(body["response_format"])
        if spec is not None:
            found.append(("response_format", spec))
    if body.get("structured_outputs") is not None:
        spec = _structured_outputs(body["structured_outputs"])
        if spec is not None:
            found.append(("structured_outputs", spec))
    for name, key in _GUIDED.items():
        if body.get(name) is not None:
            found.append((name, _one(key, body[name], name)))
    if len(found) > 1:
        raise APIError(400, f"give one of response_format, structured_outputs and guided_*; got "
                            f"{' and '.join(n for n, _ in found)}", param=found[1][0])
    return found[0][1] if found else None
