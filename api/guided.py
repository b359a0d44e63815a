"""Output constraints beyond JSON mode, in vLLM's names: the `structured_outputs` object (`regex`,
`choice`, `grammar` in Lark form, `json`, `json_object`) and the older `guided_regex`,
`guided_choice`, `guided_grammar`, `guided_json` fields, on chat and completions. The request
fields are protocol.py's `GuidedFields`; llama_jax.structured compiles each distinct constraint once
(llguidance, a bounded cache), and the output is valid by construction.

One constraint per request: two of these, or one with `response_format` json or with tool calls,
is a 400 naming the second; so is a constraint that cannot be compiled (the message says why).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from api import validation
from api.errors import invalid
from api.protocol import GuidedFields
from llama_jax import structured
from llama_jax.structured import Grammar

KINDS = ("json", "regex", "choice", "grammar")
_UNSUPPORTED = ("whitespace_pattern", "structural_tag")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One requested constraint: its kind, its value and the request field that gave it."""

    kind: str  # json | regex | choice | grammar | json_object
    value: Any
    param: str


def _given(r: GuidedFields) -> list[Spec]:
    found = []
    so = r.structured_outputs
    if so is not None:
        for name in _UNSUPPORTED:
            if getattr(so, name) is not None:
                raise invalid(f"'structured_outputs.{name}' is not supported by this server.",
                              f"structured_outputs.{name}", "unsupported_parameter")
        found += [Spec(kind, getattr(so, kind), f"structured_outputs.{kind}")
                  for kind in KINDS if getattr(so, kind) is not None]
        if so.json_object:
            found.append(Spec("json_object", None, "structured_outputs.json_object"))
        if not found:
            raise invalid("'structured_outputs' needs one of json, regex, choice, grammar or json_object: true.",
                          "structured_outputs", "missing_required_parameter")
    found += [Spec(kind, getattr(r, f"guided_{kind}"), f"guided_{kind}")
              for kind in KINDS if getattr(r, f"guided_{kind}") is not None]
    return found


def spec(r: GuidedFields, tool_calls: bool = False) -> Spec | None:
    """The one constraint a chat or completions request asks for through these fields (None: none).
    `tool_calls`: the request's tools may be called (then no other constraint fits)."""
    found = _given(r)
    if not found:
        return None
    first = found[0]
    if len(found) > 1:
        raise invalid(f"Give one output constraint: '{first.param}' and '{found[1].param}' were both given.",
                      found[1].param, "invalid_value")
    fmt = getattr(r, "response_format", None)
    if fmt is not None and fmt.type != "text":
        raise invalid(f"'{first.param}' cannot be combined with response_format '{fmt.type}'; give one of them.",
                      first.param)
    if tool_calls:
        raise invalid(f"'{first.param}' cannot be combined with tool calls; use tool_choice 'none'.", first.param,
                      "unsupported_parameter")
    if first.kind == "json":
        schema = first.value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise invalid(f"'{first.param}' is not valid JSON: {e}", first.param, "invalid_schema") from None
        validation.check_schema(schema, first.param)
        return Spec("json", schema, first.param)
    if first.kind in ("regex", "grammar") and not first.value.strip():
        raise invalid(f"'{first.param}' must not be empty.", first.param)
    return first


def grammar(tokenizer, constraint: Spec, continues_prompt: bool = False) -> Grammar:
    """The compiled grammar of a constraint (StructuredOutputError, naming its field, when it
    cannot be compiled). `continues_prompt`: raw completions, where a leading space would stay."""
    kind, value, param = constraint.kind, constraint.value, constraint.param
    if kind in ("json", "json_object"):
        return structured.json_grammar(tokenizer, value, param)
    build = {"regex": structured.regex_grammar, "choice": structured.choice_grammar,
             "grammar": structured.lark_grammar}[kind]
    return build(tokenizer, value, param, continues_prompt)
