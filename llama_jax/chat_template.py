"""A model's own Jinja chat template, rendered as transformers' `apply_chat_template` renders it
(immutable sandbox, `trim_blocks`/`lstrip_blocks`, `raise_exception`, `strftime_now`, `tojson`,
the tokenizer's special tokens as variables), and its text turned into prompt ids.

Message content is user text: special-token text typed inside it stays text. Where no content
holds special-token text (the usual case), the rendered prompt is encoded at once, exactly as
transformers does. Otherwise the template is rendered with each content wrapped in marker
characters: the text between markers is encoded with special tokens as text, the template's own
text with its markers as special tokens.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

MARK = "\ue000"  # a private-use character around each message content while rendering


class TemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`) or failed to render."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled once in transformers' sandboxed environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template does not parse: {e}") from None


def takes_tools(source: str) -> bool:
    """Whether the template renders a `tools` list itself (else the caller's tool prompt is used)."""
    return "tools" in source


def render(source: str, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
           add_generation_prompt: bool = True, special_tokens: Mapping[str, str] | None = None) -> str:
    """The template's text for a conversation (plain dicts as transformers takes them)."""
    variables = {**(special_tokens or {}), "messages": list(messages), "add_generation_prompt": add_generation_prompt}
    if tools:
        variables["tools"] = list(tools)
    try:
        return compile_template(source).render(**variables)
    except TemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise TemplateError(f"the chat template failed on this conversation: {e}") from None


def _marked(message: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(message)
    if isinstance(out.get("content"), str):
        out["content"] = MARK + out["content"] + MARK
    return out


def prompt_ids(tokenizer, source: str, messages: Sequence[Mapping[str, Any]],
               tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True) -> list[int]:
    """Prompt token ids for a conversation under the model's template (with the reply's opening
    unless `add_generation_prompt` is false)."""
    contents = [m["content"] for m in messages if isinstance(m.get("content"), str)]
    if not _holds_special_text(tokenizer, contents):  # exactly transformers' tokenization
        text = render(source, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                      special_tokens=tokenizer.special_tokens)
        return tokenizer.encode_with_specials(text)
    marked = render(source, [_marked(m) for m in messages], tools=tools, add_generation_prompt=add_generation_prompt,
                    special_tokens=tokenizer.special_tokens)
    parts = marked.split(MARK)
    if len(parts) % 2 == 0:  # the template dropped or doubled a marker: no safe split
        raise TemplateError("the chat template changed the message text in a way this server cannot tokenize safely")
    ids: list[int] = []
    for i, part in enumerate(parts):
        ids += tokenizer.encode(part) if i % 2 else tokenizer.encode_with_specials(part)
    return ids


def _holds_special_text(tokenizer, contents: Sequence[str]) -> bool:
    """Whether any content would tokenize to a special id if read as template text."""
    return any(any(tokenizer.is_control(i) for i in tokenizer.encode_with_specials(c)) for c in contents if c)
