"""Request bodies decoded and checked: msgspec against the Structs of api/protocol.py (types and
ranges), then the rules a type cannot say. Every violation is an `APIError` 400 whose `param`
names the field (nested ones as e.g. ``messages[1].tool_call_id``). A top-level field the struct
does not declare is refused or accepted by fields.py's policy (OpenAI's `Unrecognized request
argument supplied`).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import jsonschema
import msgspec
import numpy as np
from msgspec import Struct

from api import fields
from api.errors import APIError, invalid
from api.protocol import Bias, ChatCompletionRequest, SamplingFields, ToolChoiceFunction

S = TypeVar("S", bound=Struct)

MAX_SCHEMA_DEPTH = 64  # nesting levels of a JSON schema (a real one rarely has 10)
MAX_SCHEMA_VALUES = 5000  # JSON values in a request's schemas together: ~1,600 described properties; checking
#                           and compiling grows with it (1,000 properties: ~1 s each on one core)
MAX_JSON_DEPTH = 128  # nesting levels of a request body: room for such a schema inside `tools`
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_TOKEN_ID = re.compile(r"^[0-9]{1,10}$")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_AT = re.compile(r" - at `\$(.*)`$")
_LONE_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def _param(path: str, field: str | None = None) -> str | None:
    """`$.messages[0]` + `role` -> "messages[0].role" ("" is the request itself: no param)."""
    parts = path.lstrip(".")
    if field:
        parts = f"{parts}.{field}" if parts else field
    return parts or None


def validation_error(e: msgspec.ValidationError, body: bytes = b"") -> APIError:
    text = str(e)
    at = _AT.search(text)
    path, detail = (at.group(1), text[: at.start()]) if at else ("", text)
    if missing := _MISSING.search(detail):
        param = _param(path, missing.group(1))
        return invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if path == ".logit_bias[...]" and body:  # msgspec does not say which key: find it
        path = f".logit_bias.{_bad_bias_key(body)}"
    param = _param(path)
    code = "invalid_type" if detail.startswith("Expected `") and ", got `" in detail else "invalid_value"
    where = f"'{param}'" if param else "the request body"
    return invalid(f"Invalid value for {where}: {detail}.", param, code)


def _bad_bias_key(body: bytes) -> str:
    """The first `logit_bias` key whose value is not a bias (the body decodes: only a value failed)."""
    for key, value in msgspec.json.decode(body)["logit_bias"].items():
        try:
            msgspec.convert(value, Bias)
        except msgspec.ValidationError:
            return key
    return "..."


def _decode_error(e: msgspec.DecodeError, body: bytes) -> APIError:
    """A 400 for JSON that does not parse, saying why where msgspec's message would mislead."""
    if lone := _LONE_SURROGATE.search(body):
        return invalid(f"We could not parse the JSON body of your request: the escape {lone.group().decode()} at byte "
                       f"{lone.start()} is a lone UTF-16 surrogate (JSON strings must be valid Unicode; write the "
                       f"character itself or its surrogate pair).", None, "invalid_json")
    return invalid(f"We could not parse the JSON body of your request: {e}", None, "invalid_json")


def decode_struct(body: bytes, type: type[S]) -> S:
    """Parse and type/range-check a request body as `type`; APIError 400 on malformed JSON or a bad field."""
    if not body.strip():
        raise invalid("The request body is empty; expected a JSON object.", None, "invalid_json")
    if body_depth(body) > MAX_JSON_DEPTH:  # before decoding: deep input must not reach recursive code
        raise invalid(f"The JSON body of your request is nested more than {MAX_JSON_DEPTH} levels deep.", None,
                      "invalid_json")
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.ValidationError as e:
        raise validation_error(e, body) from None
    except msgspec.DecodeError as e:
        raise _decode_error(e, body) from None
    except RecursionError:  # defensive: the depth check above should have refused it
        raise invalid("The JSON body of your request is nested too deeply.", None, "invalid_json") from None


def decode(body: bytes) -> ChatCompletionRequest:
    """A checked chat request: `decode_struct`, the fields beyond it (fields.py), then `check`."""
    request = decode_struct(body, ChatCompletionRequest)
    fields.check(body, ChatCompletionRequest, fields.CHAT)
    check(request)
    return request


def check_schema(schema: Any, param: str) -> int:
    """A 400 naming `param` unless `schema` is a valid JSON schema (its own metaschema decides)
    within the size limits; returns how many JSON values it has."""
    if not isinstance(schema, dict):
        raise invalid("A JSON schema must be an object.", param, "invalid_schema")
    depth, values = json_shape(schema)
    if depth > MAX_SCHEMA_DEPTH:  # jsonschema and the grammar compiler recurse
        raise invalid(f"The schema is nested more than {MAX_SCHEMA_DEPTH} levels deep.", param, "invalid_schema")
    if values > MAX_SCHEMA_VALUES:  # before the costly checks: refusing it is cheap
        raise invalid(f"The schema is too large: it has {values} JSON values, and a request's schemas may have at "
                      f"most {MAX_SCHEMA_VALUES} together (MAX_SCHEMA_VALUES).", param, "invalid_schema")
    if not isinstance(schema.get("$schema", ""), str):
        raise invalid("`$schema` must be a string (a metaschema URI).", param, "invalid_schema")
    if not isinstance(schema.get("x-guidance", {}), dict):
        raise invalid("`x-guidance` must be an object.", param, "invalid_schema")
    try:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise invalid(f"Invalid schema{f' at /{where}' if where else ''}: {e.message}", param,
                      "invalid_schema") from None
    return values


def _check_total(values: int, param: str) -> None:
    if values > MAX_SCHEMA_VALUES:
        raise invalid(f"The request's schemas are too large: they have {values} JSON values together, and the limit "
                      f"is {MAX_SCHEMA_VALUES} (MAX_SCHEMA_VALUES).", param, "invalid_schema")


def body_depth(body: bytes) -> int:
    """The deepest bracket nesting of raw JSON text, strings skipped (C-speed: regex, translate, numpy)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    steps = np.where(np.isin(np.frombuffer(brackets, np.uint8), np.frombuffer(b"[{", np.uint8)), 1, -1)
    return int(np.cumsum(steps).max())


def json_shape(value: Any) -> tuple[int, int]:
    """(nesting depth, number of values) of decoded JSON (a scalar is (0, 1)), without recursion."""
    depth, values, level = 0, 0, [(value, 1)]
    while level:
        node, d = level.pop()
        values += 1
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            depth = max(depth, d)
            level.extend((child, d + 1) for child in children)
    return depth, values


def check_logit_bias(r: SamplingFields) -> None:
    """OpenAI's `logit_bias` keys are token ids written as strings of digits (ids past the
    vocabulary are the engine's 400)."""
    for key in r.logit_bias or ():
        if not _TOKEN_ID.match(key):
            raise invalid(f"Invalid key {key!r} in 'logit_bias': keys must be token ids (strings of digits).",
                          f"logit_bias.{key}")


def check_stops(r: SamplingFields) -> None:
    """Stop strings must not be empty."""
    if "" in r.stops():
        raise invalid("Stop sequences must not be empty strings.", "stop")


def check(r: ChatCompletionRequest) -> None:
    """Rules beyond types and ranges (OpenAI's, where OpenAI has one)."""
    for legacy, modern in (("functions", "tools"), ("function_call", "tool_choice")):
        if getattr(r, legacy) is not None:
            raise invalid(f"'{legacy}' is deprecated and not supported by this server; use '{modern}' instead "
                          f"(the replies then carry 'tool_calls').", legacy, "unsupported_parameter")
    check_logit_bias(r)
    call_ids: set[str] = set()
    for i, m in enumerate(r.messages):
        if m.role == "tool" and not m.tool_call_id:
            raise invalid("A message with role 'tool' needs a 'tool_call_id'.", f"messages[{i}].tool_call_id",
                          "missing_required_parameter")
        if m.role == "tool" and m.tool_call_id not in call_ids:
            raise invalid(f"A message with role 'tool' must answer a tool call of an earlier assistant message; "
                          f"no earlier call has the id {m.tool_call_id!r}.", f"messages[{i}].tool_call_id")
        call_ids.update(c.id for c in m.tool_calls or () if c.id)
        if m.tool_calls and m.role != "assistant":
            raise invalid("Only assistant messages may have 'tool_calls'.", f"messages[{i}].tool_calls")
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise invalid(f"A message with role '{m.role}' needs 'content'.", f"messages[{i}].content",
                          "missing_required_parameter")
        for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
            if part.get("type") != "text":
                raise invalid(f"Content parts of type {part.get('type')!r} are not supported; only 'text' parts are.",
                              f"messages[{i}].content[{j}].type", "unsupported_parameter")
            if not isinstance(part.get("text"), str):
                raise invalid("A text content part needs a string 'text'.", f"messages[{i}].content[{j}].text",
                              "missing_required_parameter" if part.get("text") is None else "invalid_type")
    check_stops(r)
    if (r.max_tokens is not None and r.max_completion_tokens is not None
            and r.max_tokens != r.max_completion_tokens):
        raise invalid("'max_tokens' and 'max_completion_tokens' are aliases; give one, or the same value.",
                      "max_completion_tokens")
    if r.top_logprobs is not None and not r.logprobs:
        raise invalid("'top_logprobs' is only allowed when 'logprobs' is true.", "top_logprobs")
    if r.stream_options is not None and not r.stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    if r.tool_choice not in (None, "none", "auto") and not r.tools:
        raise invalid("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
    if r.parallel_tool_calls is not None and not r.tools:
        raise invalid("'parallel_tool_calls' is only allowed when 'tools' are specified.", "parallel_tool_calls")
    names: set[str] = set()
    values = 0  # in every schema of the request, for MAX_SCHEMA_VALUES
    for i, tool in enumerate(r.tools or ()):
        if tool.function.name in names:
            raise invalid(f"Duplicate function name '{tool.function.name}' in 'tools'.", f"tools[{i}].function.name")
        names.add(tool.function.name)
        if tool.function.parameters is not None:
            param = f"tools[{i}].function.parameters"
            values += check_schema(tool.function.parameters, param)
            _check_total(values, param)
            if tool.function.parameters.get("type", "object") != "object":
                raise invalid("Function parameters must be a JSON schema of type 'object'.", param, "invalid_schema")
    if isinstance(r.tool_choice, ToolChoiceFunction) and r.tool_choice.function.name not in names:
        raise invalid(f"tool_choice names the function '{r.tool_choice.function.name}', which is not in 'tools'.",
                      "tool_choice")
    fmt = r.response_format
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise invalid("response_format of type 'json_schema' needs a 'json_schema' object.",
                          "response_format.json_schema", "missing_required_parameter")
        if fmt.json_schema.schema is not None:
            _check_total(values + check_schema(fmt.json_schema.schema, "response_format.json_schema.schema"),
                         "response_format.json_schema.schema")
    if fmt is not None and fmt.type != "text" and r.tool_mode()[0] != "none":
        raise invalid("response_format json_object/json_schema cannot be combined with tool calls on this server; "
                      "use tool_choice 'none', or describe the answer as a function.", "response_format",
                      "unsupported_parameter")
