"""Request bodies in, engine inputs out: JSON parsing, OpenAI/vLLM fields mapped
onto SamplingParams, prompts validated; OpenAI's error body for anything wrong.
Nothing here touches the network or the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from pyserve.errors import InvalidRequestError
from pyserve.sampling_params import INT64_MAX, SamplingParams
from pyserve.server.errors import APIError
from pyserve.server.structured_fields import grammar_spec
from pyserve.server.tool_schemas import ToolRequest, parse_tool_request


def json_body(request) -> dict:
    """The request's JSON object; 400 for a Content-Type that is not JSON (a missing one is accepted)."""
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise APIError(400, f"unsupported Content-Type {ctype!r}; send application/json")
    return parse_json(request.body)


def parse_json(body: bytes) -> dict:
    if not body:
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


# ---- fields -----------------------------------------------------------------------------------

# Fields we do not implement: a 400 saying so rather than silently ignoring them.
_UNSUPPORTED = ("functions", "function_call", "suffix", "audio", "prediction", "modalities")

_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "logit_bias", "stop", "stop_token_ids",
                    "ignore_eos", "min_tokens", "skip_special_tokens", "include_stop_str_in_output",
                    "prompt_logprobs", "truncate_prompt_tokens")

_ANY = object()  # no value of the field is accepted (but null)
# vLLM's own request fields that this server does not implement (vLLM 0.11's CompletionRequest and
# ChatCompletionRequest): a 400 naming the field, unless it is null or the value that changes nothing.
_VLLM_UNSUPPORTED: dict[str, Any] = {
    "use_beam_search": False, "length_penalty": 1.0, "spaces_between_special_tokens": True,
    "allowed_token_ids": _ANY, "bad_words": [], "prompt_embeds": _ANY,
    "structural_tag": _ANY, "guided_decoding_backend": _ANY, "guided_whitespace_pattern": _ANY,
    "priority": 0, "request_id": _ANY, "logits_processors": _ANY, "return_tokens_as_token_ids": False,
    "cache_salt": _ANY, "kv_transfer_params": _ANY, "vllm_xargs": _ANY, "repetition_detection": _ANY,
    "mm_processor_kwargs": _ANY,
}
_VLLM_UNSUPPORTED_COMPLETION = {"add_special_tokens": True}
_VLLM_UNSUPPORTED_CHAT = {"add_special_tokens": False, "continue_final_message": False, "documents": _ANY,
                          "chat_template": _ANY, "media_io_kwargs": _ANY}


def _check_unsupported(body: dict, vllm_extra: dict[str, Any]) -> None:
    for name in _UNSUPPORTED:
        v = body.get(name)
        if v is not None and v != [] and v != "":
            raise APIError(400, f"{name} is not supported by this server", param=name)
    for table in (_VLLM_UNSUPPORTED, vllm_extra):
        for name, harmless in table.items():
            v = body.get(name)
            if v is None or (harmless is not _ANY and v == harmless
                             and isinstance(v, bool) == isinstance(harmless, bool)):
                continue
            also = "" if harmless is _ANY else f" (only its default, {orjson.dumps(harmless).decode()})"
            raise APIError(400, f"{name} is not supported by this server{also}", param=name)
    _opt(body, "user", str, "a string")  # accepted for OpenAI clients that send it; not used
    bo = body.get("best_of")
    if bo is not None and bo != body.get("n", 1) and bo != 1:
        raise APIError(400, "best_of is not supported by this server", param="best_of")


def _opt(body: dict, name: str, expected: type | tuple, what: str):
    v = body.get(name)
    if v is not None and not isinstance(v, expected):
        raise APIError(400, f"{name} must be {what}, got {v!r}", param=name)
    return v


def _stream_options(body: dict) -> tuple[bool, bool, bool]:
    """stream, include_usage (a last chunk with the totals), continuous_usage_stats (vLLM: usage so far
    in every chunk)."""
    stream = _opt(body, "stream", bool, "a boolean") or False
    so = body.get("stream_options")
    if so is None:
        return stream, False, False
    if not isinstance(so, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    if not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    flags = []
    for name in ("include_usage", "continuous_usage_stats"):
        v = so.get(name, False)
        if not isinstance(v, bool) and v is not None:
            raise APIError(400, f"stream_options.{name} must be a boolean, got {v!r}", param="stream_options")
        flags.append(bool(v))
    return stream, flags[0], flags[0] and flags[1]


def sampling_params(body: dict, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    kw: dict[str, Any] = {}
    for name in _SAMPLING_FIELDS:
        v = body.get(name)
        if v is not None:
            kw[name] = v
    kw["max_tokens"] = max_tokens
    kw["logprobs"] = logprobs
    kw["structured_outputs"] = grammar_spec(body)
    try:
        return SamplingParams(**kw)
    except InvalidRequestError as e:
        raise APIError.invalid(e) from None


def _max_tokens(body: dict, names: tuple[str, ...], default: int | None) -> int | None:
    for name in names:
        v = body.get(name)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int):
                raise APIError(400, f"{name} must be an integer, got {v!r}", param=name)
            if not 1 <= v <= INT64_MAX:
                raise APIError(400, f"{name} must be in [1, {INT64_MAX}], got {v}", param=name)
            return v
    return default


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool
    continuous_usage: bool = False
    return_token_ids: bool = False


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]
    add_generation_prompt: bool
    params: SamplingParams
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs asked
    continuous_usage: bool = False
    return_token_ids: bool = False
    tools: ToolRequest | None = None  # tools, tool_choice, parallel_tool_calls
    chat_template_kwargs: dict | None = None  # vLLM's: extra template variables (enable_thinking, ...)


def _model(body: dict) -> str | None:
    return _opt(body, "model", str, "a string")


def _is_token_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompt_logprobs(body: dict, stream: bool) -> None:
    """vLLM's prompt_logprobs: an integer (checked by SamplingParams), not with streaming."""
    if body.get("prompt_logprobs") is not None and stream:
        raise APIError(400, "prompt_logprobs is not available when stream is true", param="prompt_logprobs")


def _return_token_ids(body: dict) -> bool:
    return _opt(body, "return_token_ids", bool, "a boolean") or False


def parse_completion(body: dict) -> CompletionRequest:
    _check_unsupported(body, _VLLM_UNSUPPORTED_COMPLETION)
    for name in ("tools", "tool_choice"):  # chat only
        if body.get(name) not in (None, [], "none"):
            raise APIError(400, f"{name} is only supported by /v1/chat/completions", param=name)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif _is_token_list(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_list(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids "
                            "or a list of token-id lists (non-empty)", param="prompt")
    stream, include_usage, continuous_usage = _stream_options(body)
    lp = body.get("logprobs")
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int)):
        raise APIError(400, f"logprobs must be an integer, got {lp!r}", param="logprobs")
    echo = _opt(body, "echo", bool, "a boolean") or False
    _prompt_logprobs(body, stream)
    if echo and lp is not None and body.get("prompt_logprobs") is None:
        body = {**body, "prompt_logprobs": lp}  # the echoed prompt's logprobs (as vLLM)
    params = sampling_params(body, _max_tokens(body, ("max_tokens",), 16), lp)
    return CompletionRequest(_model(body), prompts, params, stream, include_usage, echo, continuous_usage,
                             _return_token_ids(body))


def _message_content(i: int, content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"messages[{i}].content: only text parts are supported, got {kind!r}",
                               param="messages")
            parts.append(part["text"])
        return "\n".join(parts)  # as vLLM joins text parts
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


_ROLES = ("system", "developer", "user", "assistant", "tool")
# Template variables the server sets itself.
_TEMPLATE_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token"})


def _message(i: int, m: Any) -> dict:
    """A message as the chat template gets it: role (developer becomes system), content as text, and
    what tool use adds (an assistant's tool_calls, a tool result's tool_call_id, a name)."""
    if not isinstance(m, dict):
        raise APIError(400, f"messages[{i}] must be an object", param="messages")
    role = m.get("role")
    if role not in _ROLES:
        raise APIError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}",
                       param="messages")
    out = {"role": "system" if role == "developer" else role, "content": _message_content(i, m.get("content"))}
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise APIError(400, f"messages[{i}].tool_calls must be a list, in an assistant message",
                           param="messages")
        if calls:
            out["tool_calls"] = calls
            if m.get("content") is None:
                out["content"] = None  # as sent: templates test for it
    for key in ("tool_call_id", "name", "reasoning_content"):
        v = m.get(key)
        if v is not None:
            if not isinstance(v, str):
                raise APIError(400, f"messages[{i}].{key} must be a string", param="messages")
            out[key] = v
    return out


def parse_chat(body: dict) -> ChatRequest:
    _check_unsupported(body, _VLLM_UNSUPPORTED_CHAT)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of messages", param="messages")
    clean = [_message(i, m) for i, m in enumerate(messages)]
    tools = parse_tool_request(body)
    if _opt(body, "echo", bool, "a boolean"):  # vLLM's chat extra; not implemented here
        raise APIError(400, "echo is not supported for chat completions by this server", param="echo")
    stream, include_usage, continuous_usage = _stream_options(body)
    want_lp = _opt(body, "logprobs", bool, "a boolean") or False
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
        raise APIError(400, f"top_logprobs must be an integer, got {top!r}", param="top_logprobs")
    if top is not None and not want_lp:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    n_lp = (top or 0) if want_lp else None
    if n_lp is not None and not 0 <= n_lp <= 20:
        raise APIError(400, f"top_logprobs must be in [0, 20], got {n_lp}", param="top_logprobs")
    add_gen = body.get("add_generation_prompt", True)
    if not isinstance(add_gen, bool):
        raise APIError(400, "add_generation_prompt must be a boolean", param="add_generation_prompt")
    _prompt_logprobs(body, stream)
    params = sampling_params(body, _max_tokens(body, ("max_completion_tokens", "max_tokens"), None), n_lp)
    if tools is not None and tools.json_schema() is not None and params.structured_outputs is not None:
        raise APIError(400, f"tool_choice {tools.tool_choice!r} constrains the output already; it cannot be "
                            "combined with response_format or structured_outputs", param="tool_choice")
    kwargs = _opt(body, "chat_template_kwargs", dict, "an object")
    if kwargs and any(k in _TEMPLATE_RESERVED for k in kwargs):
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(sorted(_TEMPLATE_RESERVED))}",
                       param="chat_template_kwargs")
    return ChatRequest(_model(body), clean, add_gen, params, stream, include_usage, n_lp, continuous_usage,
                       _return_token_ids(body), tools, kwargs)
