"""Grammar text, before any compiler sees it: Lark builders for JSON values in our layout, and the
one scanner of JSON strings and brackets (the constraint's string state, the tool-call parser).

Kept free of llguidance and the tokenizer, so the tool-call protocol (tools.py) and the chat
template can use it; structured.py compiles what is written here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

# Separators the grammar allows (exactly json.dumps' defaults, which tools.render_tool_calls uses):
# no free whitespace, so a model cannot spend its budget on blanks.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def lark_str(text: str) -> str:
    """A Lark string literal (JSON escaping is valid Lark escaping)."""
    return json.dumps(text, ensure_ascii=False)


def lark_json(schema: Mapping[str, Any]) -> str:
    """Inline JSON schema, with our separators and no free whitespace."""
    body = dict(schema)
    body["x-guidance"] = {**(body.get("x-guidance") or {}), **JSON_STYLE}  # our layout wins
    return "%json " + json.dumps(body, ensure_ascii=False)


def json_lark(schema: Mapping[str, Any] | None) -> str:
    """Grammar of one JSON value following `schema` (None: any JSON object)."""
    return f'start: " "? body\nbody: {lark_json(schema if schema is not None else {"type": "object"})}\n'


class JsonState(NamedTuple):
    """Where JSON text stands after a prefix. Every grammar here is JSON plus literals with balanced
    quotes, so counting unescaped quotes tells strings apart."""

    inside: bool = False  # in a string
    escape: bool = False  # right after a backslash in a string
    depth: int = 0  # brackets open outside strings


def json_steps(text: str, state: JsonState = JsonState()) -> Iterator[JsonState]:
    """The state after each character of `text`, starting from `state` (bytes: decode them as
    latin-1, one character per byte)."""
    inside, escape, depth = state
    for c in text:
        if inside:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                inside = False
        elif c == '"':
            inside = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        yield JsonState(inside, escape, depth)


def json_state(text: str, state: JsonState = JsonState()) -> JsonState:
    """The state once all of `text` follows `state`."""
    for state in json_steps(text, state):
        pass
    return state


def string_end(text: str) -> int | None:
    """End index (exclusive) of the JSON string at the start of `text`, None if unfinished."""
    if not text.startswith('"'):
        return None
    return next((i + 1 for i, state in enumerate(json_steps(text)) if i and not state.inside), None)


# ------------------------------------------------------------------------------------ beyond JSON

# SentencePiece drops the "▁" (space) the first piece of a reply starts with. The grammars below
# *require* that space (unlike JSON's optional one: JSON ignores blanks), so that the decoded text,
# one leading space shorter, is exactly the constrained text, even when that text starts with a space.
LEAD_SPACE = '" " '


def lark_regex(pattern: str) -> str:
    """A regex as a Lark `/.../` terminal: unescaped `/` and raw line breaks escaped (the regex's
    meaning is unchanged; llguidance's dialect is Rust's: no look-around, no backreferences)."""
    out, escaped = [], False
    for c in pattern:
        if escaped:
            out.append(c)
            escaped = False
        elif c == "\\":
            out.append(c)
            escaped = True
        else:
            out.append({"/": "\\/", "\n": "\\n", "\r": "\\r"}.get(c, c))
    return "/" + "".join(out) + "/"


def regex_lark(pattern: str, lead_space: bool = False) -> str:
    """Grammar of text that fully matches `pattern` (after the dropped leading space where `lead_space`)."""
    return f"start: {LEAD_SPACE if lead_space else ''}{lark_regex(pattern)}\n"


def choice_lark(choices: list[str], lead_space: bool = False) -> str:
    """Grammar of exactly one of `choices`."""
    return f"start: {LEAD_SPACE if lead_space else ''}({' | '.join(map(lark_str, choices))})\n"


def nested_lark(grammar: str, lead_space: bool = False) -> str:
    """A user's Lark grammar, unchanged, or inside a nested `%lark { }` block after the dropped space."""
    return f"start: {LEAD_SPACE}user\nuser: %lark {{\n{grammar}\n}}\n" if lead_space else grammar
