"""Render a tokenizer's Jinja chat template the way transformers does
(sandboxed, trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`)."""

from __future__ import annotations

import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    pass


def _raise(message: str):
    raise ChatTemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                **extra) -> str:
    if not template:
        raise ChatTemplateError("the model has no chat template; pass one explicitly")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
