"""What a request asks its output to match: one hashable value, the key of the compile cache.

    response_format {"type": "json_object"}                -> GrammarSpec.json_object()
    response_format {"type": "json_schema", ...schema}      -> GrammarSpec.json_schema(schema)
    structured_outputs {"json": schema}                     -> GrammarSpec.json_schema(schema, param=...)
    structured_outputs {"regex": r"..."}                    -> GrammarSpec.regex(...)
    structured_outputs {"choice": ["a", "b"]}               -> GrammarSpec.choice(...)
    structured_outputs {"grammar": "start: ..."} (Lark)     -> GrammarSpec.grammar(...)

The factories check the value's type (a GrammarError naming `param`); whether a schema, regex or
grammar is valid is the backend's compile() to say.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class GrammarError(ValueError):
    """An invalid schema, regex or grammar: the request is answered 400, naming `param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message = message
        self.param = param


def canonical_json(value: Any) -> str:
    """A stable spelling of a JSON value. Keys keep their order: a schema's property order is the
    order the output's keys come in."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # one of KINDS
    # json_schema: the schema as canonical JSON text; json_object: None; regex: the pattern;
    # choice: a tuple of strings; grammar: the Lark (or GBNF) text.
    value: str | tuple[str, ...] | None
    # The request field a 400 names; not part of the key (the same schema from response_format
    # and from structured_outputs.json is one cache entry).
    param: str = field(default="response_format", compare=False)
    # vLLM's default: any JSON whitespace between tokens ("disable_any_whitespace" turns it off,
    # leaving the compact ", " / ": " separators only).
    whitespace_flexible: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown grammar kind {self.kind!r} (expected one of {', '.join(KINDS)})")

    @property
    def schema(self) -> Any:
        """The JSON schema (json_schema), {"type": "object"} (json_object), else None."""
        if self.kind == "json_schema":
            return json.loads(self.value)  # type: ignore[arg-type]
        if self.kind == "json_object":
            return {"type": "object"}
        return None

    @classmethod
    def json_schema(cls, schema: Any, param: str = "response_format", whitespace_flexible: bool = True) -> GrammarSpec:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"{param}: the JSON schema is not valid JSON ({e})", param) from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"{param}: a JSON schema must be an object, not {type(schema).__name__}", param)
        try:
            text = canonical_json(schema)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"{param}: the JSON schema is not JSON-serializable ({e})", param) from None
        return cls("json_schema", text, param, whitespace_flexible)

    @classmethod
    def json_object(cls, param: str = "response_format", whitespace_flexible: bool = True) -> GrammarSpec:
        return cls("json_object", None, param, whitespace_flexible)

    @classmethod
    def regex(cls, pattern: str, param: str = "structured_outputs.regex") -> GrammarSpec:
        if not isinstance(pattern, str):
            raise GrammarError(f"{param}: a regular expression must be a string", param)
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, choices: Any, param: str = "structured_outputs.choice") -> GrammarSpec:
        if isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__"):
            raise GrammarError(f"{param}: expected a list of strings", param)
        items = tuple(choices)
        if not items:
            raise GrammarError(f"{param}: the list of choices is empty", param)
        if not all(isinstance(c, str) for c in items):
            raise GrammarError(f"{param}: every choice must be a string", param)
        return cls("choice", items, param)

    @classmethod
    def grammar(cls, text: str, param: str = "structured_outputs.grammar") -> GrammarSpec:
        if not isinstance(text, str) or not text.strip():
            raise GrammarError(f"{param}: a grammar must be a non-empty string (Lark syntax)", param)
        return cls("grammar", text, param)
