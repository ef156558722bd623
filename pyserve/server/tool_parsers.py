"""Tool-call parsers: the model's text in, OpenAI `tool_calls` out (vLLM's `--tool-call-parser`).

Two formats, named as in vLLM:

* ``hermes`` -- Hermes 2 Pro, Qwen2.5, Qwen3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  any number of them, with text around them.
* ``llama3_json`` -- Llama 3.1/3.2 JSON tool calling: the reply *starts* (after optional whitespace and an
  optional ``<|python_tag|>``) with ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``), several of
  them separated by ``;``; text after the last call is content.

Each parser has a non-streaming ``extract(text) -> (content, calls)`` and a per-choice ``streamer()`` whose
``feed(delta)`` / ``finish()`` return OpenAI delta fragments. ``extract`` runs the very same state machine
over the whole text, so for every well-formed output and every way of splitting it into deltas:

* the concatenated ``arguments`` fragments of a call equal its non-streamed ``arguments``;
* names and indices agree (ids are made per stream/extract; within a stream a call has one id);
* the concatenated content deltas equal the non-streamed content ("" streamed <=> None non-streamed).

Content is the text outside the calls, except whitespace that only separates a call from the next call or
from the end; content that is only whitespace is None (vLLM). Text that may be the start of a tag (a
trailing ``<tool_``) is held back until the next delta (or ``finish()``) settles it.

Arguments are streamed incrementally: an incremental JSON parser re-serializes the model's argument text as
``json.dumps(json.loads(text), ensure_ascii=False)`` would, fragment by fragment (a string's characters as
they arrive, a number once it is complete). A call's first delta (id, type, name) is sent once its name is
complete and its arguments have begun (arguments written as a JSON string holding the object, which some
models do, are decoded and sent whole when the string closes).

Malformed output (a call that is not a JSON object with a string ``name`` and object ``arguments``, a call
cut off by the end of the output, ...): ``extract`` returns the whole text as content and no calls, as vLLM
does. A stream cannot take back what it has sent: if the fault shows before the call's first delta went out,
the stream sends the call's raw text (and everything after it) as content, which matches ``extract``;
if it shows later (a call truncated by ``max_tokens``, broken JSON after the name), the call stays as sent
and only the text from the fault on becomes content. ``stream.malformed`` tells the server. Either way what
a stream sends depends only on the text, never on how it was split into deltas.

Differences from vLLM, all deliberate: content is all the text outside the calls (vLLM's hermes keeps only
the text before the first call, its llama3_json none); JSON that vLLM's ``json.loads`` would accept but
that cannot round-trip safely is malformed here (duplicate keys, NaN/Infinity, numbers overflowing to
infinity, lone surrogate escapes), while raw control characters inside strings are accepted (as
``json.loads(strict=False)``; small models put literal newlines in code arguments); ``llama3_json`` only
recognises calls at the start of the reply (vLLM's streaming path does the same; its non-streaming path
also finds a JSON object in mid-text, which a stream could only match by holding back every ``{``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

__all__ = ["ToolCall", "make_tool_call_id", "ToolParser", "ToolCallStream", "HermesToolParser",
           "Llama3JsonToolParser", "RequiredToolParser", "NamedToolParser", "TOOL_PARSERS", "get_tool_parser",
           "canonical_json"]


def make_tool_call_id() -> str:
    """vLLM's id: ``chatcmpl-tool-`` and 32 random hex digits."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON text (an object)
    id: str = field(default_factory=make_tool_call_id)

    def to_dict(self) -> dict:
        """The OpenAI ``message.tool_calls[i]`` object."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


# ---- incremental JSON ------------------------------------------------------------------------------

class _Malformed(Exception):
    """Not acceptable JSON (or not a tool call). ``pos`` indexes the string being fed when it was found."""

    def __init__(self, pos: int, why: str = ""):
        super().__init__(why)
        self.pos = pos


_WS = " \t\n\r"  # JSON's whitespace, exactly what json.loads skips
_PLAIN = re.compile(r'[^"\\\x00-\x1f]+')  # string characters json.dumps(ensure_ascii=False) writes as is
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
_LITERALS = ("true", "false", "null")
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")

# states of _JsonValue
_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _AFTER, _STRING, _NUMBER_ST, _LITERAL, _DONE = range(10)


def _encode_char(c: str) -> str:
    """One decoded string character as json.dumps(..., ensure_ascii=False) writes it."""
    if c == '"' or c == "\\" or c < " ":
        return json.dumps(c)[1:-1]
    return c


def _canonical_number(tok: str, pos: int) -> str:
    if not _NUMBER.match(tok):
        raise _Malformed(pos, f"bad number {tok!r}")
    try:
        if "." in tok or "e" in tok or "E" in tok:
            f = float(tok)
            if f != f or f in (float("inf"), float("-inf")):
                raise _Malformed(pos, f"number out of range {tok!r}")
            return repr(f)
        return str(int(tok))
    except ValueError:  # more digits than int() converts
        raise _Malformed(pos, "number too long") from None


class _JsonValue:
    """Parses one JSON value fed in pieces and returns, piece by piece, its canonical form
    ``json.dumps(json.loads(text), ensure_ascii=False)`` (for the JSON this accepts, see the module doc).

    ``feed(s, i)`` consumes ``s[i:]`` up to the end of the value and returns ``(index after it, output)``;
    leading whitespace is skipped, trailing text is left to the caller. A top-level number ends only at the
    next character or at ``finish()``."""

    __slots__ = ("done", "_state", "_stack", "_tok", "_esc", "_hi", "_key", "_keys_stack", "_in_key")

    def __init__(self):
        self.done = False
        self._state = _VALUE
        self._stack: list[str] = []  # "{" or "["
        self._keys_stack: list[set[str]] = []
        self._tok = ""  # number or literal so far
        self._esc: str | None = None  # characters after a backslash, while in an escape
        self._hi: int | None = None  # a high surrogate waiting for its low half
        self._key: list[str] | None = None  # decoded text of the key being read
        self._in_key = False

    def _value_done(self) -> None:
        if self._stack:
            self._state = _AFTER
        else:
            self._state = _DONE
            self.done = True

    def _emit_char(self, c: str, out: list[str]) -> None:
        out.append(_encode_char(c))
        if self._key is not None:
            self._key.append(c)

    def feed(self, s: str, i: int = 0) -> tuple[int, str]:
        out: list[str] = []
        try:
            i = self._feed(s, i, out)
        except _Malformed as e:
            e.out = "".join(out)  # what came before the fault, so a stream can send it
            raise
        return i, "".join(out)

    def _feed(self, s: str, i: int, out: list[str]) -> int:
        n = len(s)
        while i < n and not self.done:
            st = self._state
            if st == _STRING:
                if self._esc is not None:
                    c = s[i]
                    if self._esc == "":
                        if self._hi is not None and c != "u":
                            raise _Malformed(i, "lone high surrogate")
                        if c == "u":
                            self._esc = "u"
                        elif c in _SIMPLE_ESCAPES:
                            self._esc = None
                            self._emit_char(_SIMPLE_ESCAPES[c], out)
                        else:
                            raise _Malformed(i, f"bad escape \\{c}")
                    else:
                        if c not in _HEX:
                            raise _Malformed(i, "bad \\u escape")
                        self._esc += c
                        if len(self._esc) == 5:
                            code = int(self._esc[1:], 16)
                            self._esc = None
                            if self._hi is not None:
                                if not 0xDC00 <= code <= 0xDFFF:
                                    raise _Malformed(i, "lone high surrogate")
                                code = 0x10000 + ((self._hi - 0xD800) << 10) + (code - 0xDC00)
                                self._hi = None
                                self._emit_char(chr(code), out)
                            elif 0xD800 <= code <= 0xDBFF:
                                self._hi = code
                            elif 0xDC00 <= code <= 0xDFFF:
                                raise _Malformed(i, "lone low surrogate")
                            else:
                                self._emit_char(chr(code), out)
                    i += 1
                    continue
                m = _PLAIN.match(s, i)
                if m is not None:
                    if self._hi is not None:
                        raise _Malformed(i, "lone high surrogate")
                    txt = m.group()
                    out.append(txt)
                    if self._key is not None:
                        self._key.append(txt)
                    i = m.end()
                    continue
                c = s[i]
                if c == "\\":
                    self._esc = ""
                elif self._hi is not None:
                    raise _Malformed(i, "lone high surrogate")
                elif c == '"':
                    if self._in_key:
                        key = "".join(self._key)
                        keys = self._keys_stack[-1]
                        if key in keys:
                            raise _Malformed(i, f"duplicate key {key!r}")
                        keys.add(key)
                        self._key = None
                        self._in_key = False
                        out.append('"')
                        self._state = _COLON
                    else:
                        out.append('"')
                        self._value_done()
                else:  # a raw control character: accepted, written escaped
                    self._emit_char(c, out)
                i += 1
                continue
            c = s[i]
            if st == _NUMBER_ST:
                if c in _NUMBER_CHARS:
                    self._tok += c
                    i += 1
                    continue
                out.append(_canonical_number(self._tok, i))
                self._tok = ""
                self._value_done()
                continue  # c is looked at again in the new state
            if st == _LITERAL:
                self._tok += c
                if not any(lit.startswith(self._tok) for lit in _LITERALS):
                    raise _Malformed(i, "bad literal")
                i += 1
                if self._tok in _LITERALS:
                    out.append(self._tok)
                    self._tok = ""
                    self._value_done()
                continue
            if c in _WS:
                i += 1
                continue
            if st == _VALUE or st == _VALUE_OR_CLOSE:
                if c == "{":
                    out.append("{")
                    self._stack.append("{")
                    self._keys_stack.append(set())
                    self._state = _KEY_OR_CLOSE
                elif c == "[":
                    out.append("[")
                    self._stack.append("[")
                    self._state = _VALUE_OR_CLOSE
                elif c == '"':
                    out.append('"')
                    self._state = _STRING
                elif c == "-" or "0" <= c <= "9":
                    self._tok = c
                    self._state = _NUMBER_ST
                elif c in "tfn":
                    self._tok = c
                    self._state = _LITERAL
                elif c == "]" and st == _VALUE_OR_CLOSE:
                    out.append("]")
                    self._stack.pop()
                    self._value_done()
                else:
                    raise _Malformed(i, f"unexpected {c!r}")
            elif st == _KEY or st == _KEY_OR_CLOSE:
                if c == '"':
                    out.append('"')
                    self._state = _STRING
                    self._in_key = True
                    self._key = []
                elif c == "}" and st == _KEY_OR_CLOSE:
                    out.append("}")
                    self._stack.pop()
                    self._keys_stack.pop()
                    self._value_done()
                else:
                    raise _Malformed(i, f"expected a key, got {c!r}")
            elif st == _COLON:
                if c != ":":
                    raise _Malformed(i, f"expected ':', got {c!r}")
                out.append(": ")
                self._state = _VALUE
            elif st == _AFTER:
                top = self._stack[-1]
                if c == ",":
                    out.append(", ")
                    self._state = _KEY if top == "{" else _VALUE
                elif (c == "}" and top == "{") or (c == "]" and top == "["):
                    out.append(c)
                    self._stack.pop()
                    if top == "{":
                        self._keys_stack.pop()
                    self._value_done()
                else:
                    raise _Malformed(i, f"unexpected {c!r}")
            i += 1
        return i

    def finish(self, pos: int = 0) -> str:
        """End of input: completes a top-level number; anything else unfinished is malformed."""
        if self._state == _NUMBER_ST and not self._stack:
            out = _canonical_number(self._tok, pos)
            self._tok = ""
            self._value_done()
            return out
        if not self.done:
            raise _Malformed(pos, "truncated JSON")
        return ""


def canonical_json(text: str) -> str:
    """The whole of ``text`` as one JSON value, in canonical form; ValueError if it is not acceptable."""
    v = _JsonValue()
    try:
        i, out = v.feed(text)
        out += v.finish(len(text))
        if text[i:].strip(_WS):
            raise _Malformed(i, "extra data")
    except _Malformed as e:
        raise ValueError(f"not acceptable JSON at {e.pos}: {e}") from None
    return out


# ---- one call object: {"name": ..., "arguments": {...}} ------------------------------------------------

_C_START, _C_KEY_OR_CLOSE, _C_KEY, _C_IN_KEY, _C_COLON, _C_VALUE_START, _C_IN_VALUE, _C_AFTER, _C_DONE = range(9)


class _CallParser:
    """Parses one call object fed in pieces and reports to ``sink`` the moment things happen:
    ``sink._call_ready(name)`` when the name is complete and the arguments value has begun (whichever comes
    second), ``sink._call_args(fragment)`` for each piece of canonical arguments text. An arguments value
    that is a JSON *string* holding an object (as some models write) is decoded and reported whole when it
    closes. Reporting at the character where it happens makes a stream's output independent of how the
    text was split, malformed text included."""

    def __init__(self, sink: "ToolCallStream", args_keys: tuple[str, ...], allow_extra: bool | frozenset[str]):
        self.sink = sink
        self.args_keys = args_keys
        self.allow_extra = allow_extra
        self.name: str | None = None
        self.args_started = False
        self.args_done = False
        self.done = False
        self._state = _C_START
        self._sub: _JsonValue | None = None
        self._sub_out: list[str] = []
        self._role = ""  # what the value being parsed is: "name", "args", "args_str", "extra"
        self._key = ""
        self._seen: set[str] = set()
        self._pending: list[str] = []  # arguments text produced before the name was known

    def _args(self, frag: str) -> None:
        if not frag:
            return
        if self.name is None:
            self._pending.append(frag)
        else:
            self.sink._call_args(frag)

    def _maybe_ready(self) -> None:
        if self.name is not None and self.args_started:
            self.sink._call_ready(self.name)
            if self._pending:
                self.sink._call_args("".join(self._pending))
                self._pending.clear()

    def _value_finished(self, pos: int) -> None:
        out = "".join(self._sub_out)
        self._sub = None
        self._sub_out = []
        self._state = _C_AFTER
        if self._role == "name":
            name = json.loads(out)
            if not isinstance(name, str) or not name:
                raise _Malformed(pos, "name is not a non-empty string")
            self.name = name
            self._maybe_ready()
        elif self._role == "args_str":
            try:
                args = canonical_json(json.loads(out))
            except ValueError:
                raise _Malformed(pos, "arguments string is not JSON") from None
            if not args.startswith("{"):
                raise _Malformed(pos, "arguments are not an object")
            self.args_done = True
            self.args_started = True  # only now: the first delta goes out once the string is known good
            self._maybe_ready()
            self._args(args)
        elif self._role == "args":
            self.args_done = True

    def feed(self, s: str, i: int = 0) -> int:
        n = len(s)
        while i < n and not self.done:
            st = self._state
            if st == _C_IN_KEY or st == _C_IN_VALUE:
                try:
                    i, out = self._sub.feed(s, i)
                except _Malformed as e:
                    if self._role == "args" and st == _C_IN_VALUE:
                        self._args(e.out)
                    raise
                if self._role == "args" and st == _C_IN_VALUE:
                    self._args(out)
                else:
                    self._sub_out.append(out)
                if not self._sub.done:
                    continue  # consumed everything
                if st == _C_IN_KEY:
                    key = json.loads("".join(self._sub_out))
                    self._sub = None
                    self._sub_out = []
                    if key in self._seen or (key in self.args_keys and self._seen & set(self.args_keys)):
                        raise _Malformed(i - 1, f"duplicate key {key!r}")
                    if key != "name" and key not in self.args_keys and not (
                            self.allow_extra is True or (self.allow_extra and key in self.allow_extra)):
                        raise _Malformed(i - 1, f"unexpected key {key!r}")
                    self._seen.add(key)
                    self._key = key
                    self._state = _C_COLON
                else:
                    self._value_finished(i)
                continue
            c = s[i]
            if c in _WS:
                i += 1
                continue
            if st == _C_START:
                if c != "{":
                    raise _Malformed(i, "a call must be a JSON object")
                self._state = _C_KEY_OR_CLOSE
                i += 1
            elif st == _C_KEY_OR_CLOSE or st == _C_KEY:
                if c == '"':
                    self._sub = _JsonValue()
                    self._role = "key"
                    self._state = _C_IN_KEY
                elif c == "}" and st == _C_KEY_OR_CLOSE:
                    self._close(i)
                    i += 1
                else:
                    raise _Malformed(i, "expected a key")
            elif st == _C_COLON:
                if c != ":":
                    raise _Malformed(i, "expected ':'")
                self._state = _C_VALUE_START
                i += 1
            elif st == _C_VALUE_START:
                key = self._key
                self._sub = _JsonValue()
                self._state = _C_IN_VALUE
                if key == "name":
                    self._role = "name"
                elif key in self.args_keys:
                    if c == "{":
                        self._role = "args"
                        self.args_started = True
                        self._maybe_ready()
                    elif c == '"':
                        self._role = "args_str"
                    else:
                        raise _Malformed(i, "arguments must be an object")
                else:
                    self._role = "extra"
            elif st == _C_AFTER:
                if c == ",":
                    self._state = _C_KEY
                    i += 1
                elif c == "}":
                    self._close(i)
                    i += 1
                else:
                    raise _Malformed(i, "expected ',' or '}'")
        return i

    def _close(self, pos: int) -> None:
        if self.name is None or not self.args_done:
            raise _Malformed(pos, "a call needs a name and arguments")
        self.done = True
        self._state = _C_DONE


# ---- streams --------------------------------------------------------------------------------------

class ToolCallStream:
    """Per-choice streaming state. ``feed(delta)`` and ``finish()`` return OpenAI delta fragments:
    ``{"content": str}``, ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name",
    "arguments": ""}}]}`` (a call's first delta), ``{"tool_calls": [{"index", "function": {"arguments"}}]}``.

    ``calls`` holds the calls completed so far, ``tools_called`` whether any call's first delta was sent
    (then OpenAI's finish_reason is "tool_calls"), ``malformed`` whether the output broke the format."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self.malformed = False
        self.tools_called = False
        self._out: list[dict] = []
        self._content_started = False  # some non-whitespace content was sent
        self._ws_hold = ""  # leading whitespace-only content, sent once real content follows
        self._index = -1  # index of the current call
        self._id = ""
        self._name = ""
        self._args: list[str] = []
        self._header_sent = False
        self._finished = False

    # -- output helpers
    def _emit_content(self, text: str) -> None:
        if not text:
            return
        if not self._content_started:
            self._ws_hold += text
            if not self._ws_hold.strip():
                return
            text, self._ws_hold = self._ws_hold, ""
            self._content_started = True
        if self._out and "content" in self._out[-1]:
            self._out[-1]["content"] += text
        else:
            self._out.append({"content": text})

    def _begin_call(self) -> None:
        self._index += 1
        self._id = make_tool_call_id()
        self._name = ""
        self._args = []
        self._header_sent = False

    def _visible(self) -> bool:
        return self.max_calls is None or self._index < self.max_calls

    def _send_header(self, name: str) -> None:
        self._name = name
        self._header_sent = True
        if self._visible():
            self.tools_called = True
            self._out.append({"tool_calls": [{"index": self._index, "id": self._id, "type": "function",
                                              "function": {"name": name, "arguments": ""}}]})

    def _send_args(self, frag: str) -> None:
        if not frag:
            return
        self._args.append(frag)
        if not self._visible():
            return
        last = self._out[-1] if self._out else None
        if last is not None and "tool_calls" in last and "id" not in last["tool_calls"][0] \
                and last["tool_calls"][0]["index"] == self._index:
            last["tool_calls"][0]["function"]["arguments"] += frag
        else:
            self._out.append({"tool_calls": [{"index": self._index, "function": {"arguments": frag}}]})

    # -- _CallParser's sink
    def _call_ready(self, name: str) -> None:
        if not self._header_sent:
            self._send_header(name)

    def _call_args(self, frag: str) -> None:
        self._send_args(frag)

    def _end_call(self) -> None:
        if self._visible():
            self.calls.append(ToolCall(self._name, "".join(self._args), self._id))

    def _fail_into(self, mode: int, buf: str, pos: int) -> None:
        """The current call is malformed at ``buf[pos]``: switch to `mode`, and what the client has not
        seen as a call (all of it, if its header was not sent) goes out as content."""
        self.malformed = True
        self._mode = mode
        if self._header_sent:
            self._emit_content(buf[pos:])
        else:
            self._emit_content("".join(self._raw) + buf)
        self._raw = []

    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    # -- API
    def feed(self, delta: str) -> list[dict]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if delta:
            self._feed(delta)
        return self._take()

    def finish(self) -> list[dict]:
        if not self._finished:
            self._finished = True
            self._finish()
            self._ws_hold = ""  # whitespace-only content is no content (None), as vLLM
        return self._take()

    def _feed(self, delta: str) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError


def _partial_suffix(buf: str, tag: str) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``tag``."""
    for k in range(min(len(buf), len(tag) - 1), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


_H_CONTENT, _H_CALL, _H_AFTER, _H_PASS = range(4)


class _HermesStream(ToolCallStream):
    START = "<tool_call>"
    END = "</tool_call>"

    def __init__(self, max_calls: int | None = None):
        super().__init__(max_calls)
        self._mode = _H_CONTENT
        self._buf = ""
        self._raw: list[str] = []  # text of the current call so far, for the fallback
        self._parser: _CallParser | None = None
        self._gap: str | None = None  # whitespace after a call: dropped if the next call or the end follows

    def _fail(self, buf: str, pos: int) -> None:
        """The current call is malformed at ``buf[pos]``: from here on everything is content."""
        self._fail_into(_H_PASS, buf, pos)

    def _feed(self, delta: str) -> None:
        buf = self._buf + delta
        self._buf = ""
        while buf:
            mode = self._mode
            if mode == _H_CONTENT:
                if self._gap is not None:
                    rest = buf.lstrip(_WS)
                    self._gap += buf[:len(buf) - len(rest)]
                    buf = rest
                    if not buf:
                        return
                    if not buf.startswith(self.START):
                        if self.START.startswith(buf):
                            self._buf = buf
                            return
                        self._emit_content(self._gap)
                    self._gap = None
                k = buf.find(self.START)
                if k < 0:
                    hold = _partial_suffix(buf, self.START)
                    self._emit_content(buf[:len(buf) - hold])
                    self._buf = buf[len(buf) - hold:]
                    return
                self._emit_content(buf[:k])
                buf = buf[k + len(self.START):]
                self._mode = _H_CALL
                self._raw = [self.START]
                self._parser = _CallParser(self, ("arguments",), allow_extra=True)
                self._begin_call()
            elif mode == _H_CALL:
                try:
                    i = self._parser.feed(buf)
                except _Malformed as e:
                    self._fail(buf, e.pos)
                    return
                self._raw.append(buf[:i])
                buf = buf[i:]
                if self._parser.done:
                    self._mode = _H_AFTER
            elif mode == _H_AFTER:
                j = len(buf) - len(buf.lstrip(_WS))
                self._raw.append(buf[:j])
                buf = buf[j:]
                if not buf:
                    return
                if buf.startswith(self.END):
                    buf = buf[len(self.END):]
                    self._end_call()
                    self._mode = _H_CONTENT
                    self._raw = []
                    self._gap = ""
                elif self.END.startswith(buf):
                    self._buf = buf
                    return
                else:
                    self._fail(buf, 0)
                    return
            else:  # _H_PASS
                self._emit_content(buf)
                return

    def _finish(self) -> None:
        buf, self._buf = self._buf, ""
        if self._mode == _H_CONTENT or self._mode == _H_PASS:
            if buf and self._gap:
                self._emit_content(self._gap)
            self._emit_content(buf)
        elif self._mode == _H_CALL:
            self._fail("", 0)  # truncated: the raw call text is content unless its first delta went out
        else:  # _H_AFTER: the object is complete; a missing (or cut-off) end tag is forgiven
            self._end_call()


_L_START, _L_AFTER_TAG, _L_CALL, _L_BETWEEN, _L_SEP, _L_CONTENT = range(6)


class _Llama3JsonStream(ToolCallStream):
    TAG = "<|python_tag|>"

    def __init__(self, max_calls: int | None = None):
        super().__init__(max_calls)
        self._mode = _L_START
        self._buf = ""
        self._raw: list[str] = []
        self._parser: _CallParser | None = None

    def _start_call(self) -> None:
        self._mode = _L_CALL
        self._parser = _CallParser(self, ("arguments", "parameters"), allow_extra=frozenset({"type"}))
        self._begin_call()

    def _fail(self, buf: str, pos: int) -> None:
        self._fail_into(_L_CONTENT, buf, pos)

    def _feed(self, delta: str) -> None:
        buf = self._buf + delta
        self._buf = ""
        while buf:
            mode = self._mode
            if mode == _L_START:
                rest = buf.lstrip(_WS)
                if not rest or (self.TAG.startswith(rest) and rest != self.TAG):
                    self._buf = buf
                    return
                lead = buf[:len(buf) - len(rest)]
                if rest.startswith(self.TAG):
                    self._raw = [lead, self.TAG]
                    buf = rest[len(self.TAG):]
                    self._mode = _L_AFTER_TAG
                elif rest[0] == "{":
                    self._raw = [lead]
                    buf = rest
                    self._start_call()
                else:  # not a tool call: plain content from here on
                    self._mode = _L_CONTENT
            elif mode == _L_AFTER_TAG:
                rest = buf.lstrip(_WS)
                self._raw.append(buf[:len(buf) - len(rest)])
                buf = rest
                if not buf:
                    return
                if buf[0] == "{":
                    self._start_call()
                else:  # <|python_tag|> and code (a built-in tool): content, not a JSON call
                    self._emit_content("".join(self._raw))
                    self._raw = []
                    self._mode = _L_CONTENT
            elif mode == _L_CALL:
                try:
                    i = self._parser.feed(buf)
                except _Malformed as e:
                    self._fail(buf, e.pos)
                    return
                self._raw.append(buf[:i])
                buf = buf[i:]
                if self._parser.done:
                    self._end_call()
                    self._raw = []
                    self._mode = _L_BETWEEN
            elif mode == _L_BETWEEN:
                rest = buf.lstrip(_WS)
                if not rest:
                    self._buf = buf
                    return
                if rest[0] == ";":
                    self._raw = [buf[:len(buf) - len(rest)], ";"]
                    buf = rest[1:]
                    self._mode = _L_SEP
                else:  # text after the calls is content
                    self._mode = _L_CONTENT
            elif mode == _L_SEP:
                rest = buf.lstrip(_WS)
                self._raw.append(buf[:len(buf) - len(rest)])
                buf = rest
                if not buf:
                    return
                if buf[0] == "{":
                    self._start_call()
                else:
                    self._fail(buf, 0)
                    return
            else:  # _L_CONTENT
                self._emit_content(buf)
                return

    def _finish(self) -> None:
        buf, self._buf = self._buf, ""
        mode = self._mode
        if mode == _L_AFTER_TAG:
            self._emit_content("".join(self._raw))
        elif mode == _L_CALL:
            self._fail("", 0)
        elif mode == _L_START or mode == _L_CONTENT:
            self._emit_content(buf)
        # _L_BETWEEN: whitespace after the last call is not content; _L_SEP: a trailing ";" is forgiven


_R_START, _R_ITEM_OR_CLOSE, _R_ITEM, _R_CALL, _R_AFTER, _R_END, _R_FAILED = range(7)


class _RequiredStream(ToolCallStream):
    """tool_choice="required": the output is constrained to ``[{"name": ..., "parameters": {...}}, ...]``
    (tool_schemas.required_schema). Never any content; text after the array is ignored; malformed output
    (cut off by max_tokens) gives no further calls, and ``extract`` none at all (vLLM)."""

    def __init__(self, max_calls: int | None = None):
        super().__init__(max_calls)
        self._mode = _R_START
        self._parser: _CallParser | None = None

    def _feed(self, delta: str) -> None:
        buf = delta
        i = 0
        n = len(buf)
        while i < n:
            mode = self._mode
            if mode == _R_FAILED or mode == _R_END:  # text after the array is ignored (vLLM)
                return
            if mode == _R_CALL:
                try:
                    i = self._parser.feed(buf, i)
                except _Malformed:
                    self._mode = _R_FAILED
                    self.malformed = True
                    return
                if self._parser.done:
                    self._end_call()
                    self._mode = _R_AFTER
                continue
            c = buf[i]
            i += 1
            if c in _WS:
                continue
            if mode == _R_START and c == "[":
                self._mode = _R_ITEM_OR_CLOSE
            elif (mode == _R_ITEM_OR_CLOSE or mode == _R_ITEM) and c == "{":
                i -= 1
                self._parser = _CallParser(self, ("parameters",), allow_extra=True)
                self._begin_call()
                self._mode = _R_CALL
            elif (mode == _R_ITEM_OR_CLOSE or mode == _R_AFTER) and c == "]":
                self._mode = _R_END
            elif mode == _R_AFTER and c == ",":
                self._mode = _R_ITEM
            else:
                self._mode = _R_FAILED
                self.malformed = True
                return

    def _finish(self) -> None:
        if self._mode != _R_END and self._mode != _R_FAILED:
            self.malformed = True


class _NamedStream(ToolCallStream):
    """tool_choice={"type": "function", "function": {"name": N}}: the output, constrained to N's parameters
    schema, *is* the arguments, passed on as generated (vLLM)."""

    def __init__(self, name: str, max_calls: int | None = None):
        super().__init__(max_calls)
        self._fname = name

    def _feed(self, delta: str) -> None:
        if self._index < 0:
            self._begin_call()
            self._send_header(self._fname)
        self._send_args(delta)

    def _finish(self) -> None:
        if self._index < 0:
            self._begin_call()
            self._send_header(self._fname)
        self._end_call()


# ---- parsers ---------------------------------------------------------------------------------------

class ToolParser:
    """Stateless; ``streamer()`` makes the per-choice state."""

    name = ""
    # What an auto-mode non-streaming result is when the output is malformed: the whole text as content.
    _fallback_to_text = True

    def streamer(self, max_calls: int | None = None) -> ToolCallStream:
        raise NotImplementedError

    def extract(self, text: str, max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
        """``(content, calls)``: content None if it is only whitespace; malformed -> ``(text, [])``.
        ``max_calls=1`` keeps only the first call (parallel_tool_calls=false, as vLLM)."""
        s = self.streamer(max_calls)
        deltas = s.feed(text) + s.finish()
        if s.malformed:
            return (text if self._fallback_to_text and text.strip() else None), []
        content = "".join(d["content"] for d in deltas if "content" in d)
        return (content or None), list(s.calls)


class HermesToolParser(ToolParser):
    name = "hermes"

    def streamer(self, max_calls: int | None = None) -> ToolCallStream:
        return _HermesStream(max_calls)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def streamer(self, max_calls: int | None = None) -> ToolCallStream:
        return _Llama3JsonStream(max_calls)


class RequiredToolParser(ToolParser):
    """Output constrained by tool_choice="required"; content is always None."""

    name = "required"
    _fallback_to_text = False

    def streamer(self, max_calls: int | None = None) -> ToolCallStream:
        return _RequiredStream(max_calls)

    def extract(self, text: str, max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
        s = self.streamer(max_calls)
        s.feed(text)
        s.finish()
        return None, ([] if s.malformed else list(s.calls))


class NamedToolParser(ToolParser):
    """Output constrained by a named tool_choice: one call, the text is its arguments; content None."""

    def __init__(self, function_name: str):
        self.name = function_name

    def streamer(self, max_calls: int | None = None) -> ToolCallStream:
        return _NamedStream(self.name, max_calls)

    def extract(self, text: str, max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
        return None, [ToolCall(self.name, text)]


TOOL_PARSERS: dict[str, ToolParser] = {
    "hermes": HermesToolParser(),
    "llama3_json": Llama3JsonToolParser(),
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose from {sorted(TOOL_PARSERS)}") from None
