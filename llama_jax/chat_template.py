"""A model's own Jinja chat template, rendered as transformers' `apply_chat_template` renders it
(immutable sandbox, `trim_blocks`/`lstrip_blocks`, `raise_exception`, `strftime_now`, `tojson`,
the tokenizer's special tokens as variables), and its text turned into prompt ids.

Every string of the conversation and the tools is user text: special-token text typed inside it
stays text. Before rendering, each occurrence of a special token's text in those strings is
wrapped in two Unicode noncharacters (removed from the input first, so a user cannot forge them).
Where the rendered text holds no marks (the usual case) it is encoded at once, exactly as
transformers does; otherwise only the template's unmarked special tokens become special ids, and
the text between them, the marked tokens included, is encoded as text.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Noncharacters (reserved by Unicode for internal use) around special-token text found in user strings.
MARK_OPEN, MARK_CLOSE = "\ufdd0", "\ufdd1"


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


@functools.lru_cache(maxsize=8)
def takes_tools(source: str) -> bool:
    """Whether the template reads the `tools` variable, i.e. renders the tools itself (else the
    caller's tool prompt is used); the word in its text or a comment does not count."""
    return "tools" in jinja2.meta.find_undeclared_variables(compile_template(source).environment.parse(source))


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


@functools.lru_cache(maxsize=8)
def _patterns(specials: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """A regex of the special tokens' texts (longest first), and one that finds in rendered text a
    marked special token (group 1), a lone mark, or a special token the template wrote (group 2)."""
    texts = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) or "(?!)"
    return re.compile(texts), re.compile(f"{MARK_OPEN}({texts}){MARK_CLOSE}|[{MARK_OPEN}{MARK_CLOSE}]|({texts})")


def mark_special_text(value: Any, specials: re.Pattern[str]) -> Any:
    """`value` (a string, or lists and dicts of them, as messages and tools are) with marks around
    every special token's text in its strings, and any marks it held removed. Dict keys stay."""
    if isinstance(value, str):
        value = value.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")
        return specials.sub(lambda m: MARK_OPEN + m.group(0) + MARK_CLOSE, value)
    if isinstance(value, Mapping):
        return {k: mark_special_text(v, specials) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mark_special_text(v, specials) for v in value]
    return value


def encode_marked(tokenizer, text: str) -> list[int]:
    """Ids of rendered text: unmarked special tokens (the template's) as their ids, everything else
    (marked tokens without their marks included) as text, piece by piece between special tokens,
    as the tokenizer itself splits at them. Lone marks (a template cut a string) are dropped."""
    specials = tokenizer.special_ids
    ids: list[int] = []
    run: list[str] = []
    position = 0
    for m in _patterns(tuple(specials))[1].finditer(text):
        run.append(text[position:m.start()])
        position = m.end()
        if m.group(1) is not None:
            run.append(m.group(1))
        elif m.group(2) is not None:
            ids += tokenizer.encode("".join(run))
            run = []
            ids.append(specials[m.group(2)])
    return ids + tokenizer.encode("".join(run) + text[position:])


def prompt_ids(tokenizer, source: str, messages: Sequence[Mapping[str, Any]],
               tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True) -> list[int]:
    """Prompt token ids for a conversation under the model's template (with the reply's opening
    unless `add_generation_prompt` is false); special-token text in the messages or tools stays text."""
    find = _patterns(tuple(tokenizer.special_ids))[0]
    text = render(source, mark_special_text(list(messages), find), tools=mark_special_text(tools, find),
                  add_generation_prompt=add_generation_prompt, special_tokens=tokenizer.special_tokens)
    if MARK_OPEN in text or MARK_CLOSE in text:
        return encode_marked(tokenizer, text)
    return tokenizer.encode_with_specials(text)  # exactly transformers' tokenization
