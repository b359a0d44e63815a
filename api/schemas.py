"""The chat-completions request: its wire format and validation (every seed-page field with its
range and default, plus what openai clients send), and the engine request it becomes. The
response bodies and SSE framing are responses.py's.

Decoding is msgspec against the Structs below (types and ranges), then `check` adds the rules a
type cannot say. Every violation is an `APIError` 400 whose `param` names the field (nested ones
as e.g. ``messages[1].tool_call_id``). A top-level field the struct does not declare is refused
or accepted by fields.py's policy (OpenAI's `Unrecognized request argument supplied`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import jsonschema
import msgspec
import numpy as np
from msgspec import Meta, Struct

from api import fields
from api.errors import APIError, invalid
from llama_jax.request import MAX_CHOICES, MAX_STOP_STRINGS, Constraint, Request, SamplingOptions
from llama_jax.sampling import MAX_BIAS, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from llama_jax.tools import ToolSpec

MAX_STOP_TOKEN_IDS = 32  # a request's own stop_token_ids (the engine's limit, EOS ids included, is 64)


class FunctionCall(Struct):
    name: str
    arguments: str = ""


class ToolCall(Struct):
    function: FunctionCall
    id: str | None = None
    type: Literal["function"] = "function"


class Message(Struct, kw_only=True):
    """One conversation message. Content: a string, a list of {"type": "text", "text": ...} parts,
    or null for an assistant message that only carries tool_calls."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant only
    tool_call_id: str | None = None  # tool only (required there)


Name = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="a-z, A-Z, 0-9, _ and -, at most 64")]


class FunctionDef(Struct, kw_only=True):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of type object; omitted: no arguments
    strict: bool | None = None  # accepted; arguments always follow the schema here


class Tool(Struct):
    function: FunctionDef
    type: Literal["function"] = "function"


class FunctionName(Struct):
    name: str


class ToolChoiceFunction(Struct):
    function: FunctionName
    type: Literal["function"] = "function"


class JsonSchemaFormat(Struct, kw_only=True):
    name: Name
    schema: dict[str, Any] | None = None  # omitted: any JSON object
    description: str | None = None
    strict: bool | None = None  # accepted; the output always validates here


class ResponseFormat(Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Struct, kw_only=True):
    include_usage: bool | None = None


def _doc(description: str, **constraints: Any) -> Meta:
    return Meta(description=description, **constraints)


Unit = Annotated[float, _doc("in [0, 1]", ge=0, le=1)]
Penalty = Annotated[float, _doc("in [-2, 2]; default 0", ge=-2, le=2)]
MaxTokens = Annotated[int, _doc("1 <= max_tokens <= 1000000; default: the rest of the context", ge=1, le=1_000_000)]
Bias = Annotated[float, Meta(ge=-MAX_BIAS, le=MAX_BIAS)]
Choices = Annotated[list[str], _doc("the output is exactly one of these", min_length=1, max_length=256)]
JsonSchemaText = Annotated[dict[str, Any] | str, _doc("a JSON schema (an object, or its JSON text)")]


class StructuredOutputs(Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `structured_outputs`: one constraint on the output (api/guided.py compiles it)."""

    json: JsonSchemaText | None = None
    regex: Annotated[str, _doc("the output fully matches this regex (Rust syntax)")] | None = None
    choice: Choices | None = None
    grammar: Annotated[str, _doc("the output is in this Lark grammar's language (llguidance's dialect)")] | None = None
    json_object: Annotated[bool, _doc("true: any JSON object")] | None = None
    disable_any_whitespace: Annotated[bool, _doc("accepted: JSON output never has free whitespace here")] | None = None
    disable_fallback: Annotated[bool, _doc("accepted: there is no fallback backend")] | None = None
    whitespace_pattern: Annotated[str, _doc("refused with a 400 (unsupported)")] | None = None
    structural_tag: Annotated[Any, _doc("refused with a 400 (unsupported)")] | None = None


class GuidedFields(Struct, kw_only=True):
    """The structured-output extensions of chat and completions requests (vLLM's names)."""

    structured_outputs: StructuredOutputs | None = None
    guided_json: Annotated[JsonSchemaText, _doc("older name of structured_outputs.json")] | None = None
    guided_regex: Annotated[str, _doc("older name of structured_outputs.regex")] | None = None
    guided_choice: Annotated[Choices, _doc("older name of structured_outputs.choice")] | None = None
    guided_grammar: Annotated[str, _doc("older name of structured_outputs.grammar")] | None = None


class ChatCompletionRequest(GuidedFields, kw_only=True):
    """POST /v1/chat/completions (alias /v1/openai/chat/completions). null means the default."""

    model: Annotated[str, _doc("model name; this server serves exactly one")]
    messages: Annotated[list[Message], _doc("conversation: (user, assistant, tool)*, user, with system messages anywhere",
                                            min_length=1)]
    stream: Annotated[bool, _doc("stream chat.completion.chunk events over SSE; default false")] | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, _doc("0 <= temperature <= 2; default 1; 0 is greedy", ge=0, le=2)] | None = None
    top_p: Annotated[float, _doc("0 < top_p <= 1; default 1", gt=0, le=1)] | None = None
    min_p: Annotated[Unit, _doc("0 <= min_p <= 1; default 0 (off)")] | None = None
    top_k: Annotated[int, _doc("0 <= top_k < 1000; default 0 (off)", ge=0, lt=1000)] | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: Annotated[MaxTokens, _doc("alias of max_tokens")] | None = None
    stop: str | Annotated[list[str], _doc("up to 16 non-empty stop strings", max_length=MAX_STOP_STRINGS)] | None = None
    n: Annotated[int, _doc(f"1 <= n <= {MAX_CHOICES}; default 1 (choices beyond the free slots wait for theirs)",
                           ge=1, le=MAX_CHOICES)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, _doc("0.01 <= repetition_penalty <= 5; default 1", ge=0.01, le=5)] | None = None
    tools: Annotated[list[Tool], _doc("function tools; calls follow their parameter schemas")] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: Annotated[bool, _doc("allow several tool calls in one reply; default true")] | None = None
    response_format: Annotated[ResponseFormat,
                               _doc("text, json_object or json_schema (output valid by construction)")] | None = None
    logprobs: Annotated[bool, _doc("return the logprob of every generated token")] | None = None
    top_logprobs: Annotated[int, _doc("0..20 alternatives per token; needs logprobs: true",
                                      ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    user: Annotated[str, _doc("end-user id; informational")] | None = None
    seed: Annotated[int, _doc("0 <= seed < 2^63; default: random", ge=0, le=2**63 - 1)] | None = None
    logit_bias: Annotated[dict[str, Bias],
                          _doc(f"token id (a string of digits) -> bias in [-100, 100] added to its logit; "
                               f"at most {MAX_LOGIT_BIAS} tokens", max_length=MAX_LOGIT_BIAS)] | None = None
    min_tokens: Annotated[int, _doc("vLLM's: no stop token (EOS included) and no stop string ends a choice before "
                                    "this many tokens; default 0", ge=0, le=1_000_000)] | None = None
    ignore_eos: Annotated[bool, _doc("vLLM's: the model's end-of-sequence tokens do not stop generation; "
                                     "default false")] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Meta(ge=0)]],
                              _doc(f"vLLM's: token ids that also end a choice (the token is not returned as text); "
                                   f"at most {MAX_STOP_TOKEN_IDS}", max_length=MAX_STOP_TOKEN_IDS)] | None = None
    speculative: Annotated[bool, _doc("prompt-lookup speculative decoding for this request (the same output, often "
                                      "faster when the reply copies the prompt); default: the server's "
                                      "--speculative-ngram setting; true on a server without it is a 400")] | None = None
    functions: Annotated[Any, _doc("legacy; refused with a 400: use tools")] | None = None
    function_call: Annotated[Any, _doc("legacy; refused with a 400: use tool_choice")] | None = None


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


def _validation_error(e: msgspec.ValidationError, body: bytes = b"") -> APIError:
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


def decode_struct(body: bytes, type: type[Struct]) -> Any:
    """Parse and type/range-check a request body as `type`; APIError 400 on malformed JSON or a bad field."""
    if not body.strip():
        raise invalid("The request body is empty; expected a JSON object.", None, "invalid_json")
    if body_depth(body) > MAX_JSON_DEPTH:  # before decoding: deep input must not reach recursive code
        raise invalid(f"The JSON body of your request is nested more than {MAX_JSON_DEPTH} levels deep.", None,
                      "invalid_json")
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.ValidationError as e:
        raise _validation_error(e, body) from None
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


def _check_schema(schema: Any, param: str) -> int:
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


def tool_mode(r: ChatCompletionRequest) -> tuple[str, str | None]:
    """("none" | "auto" | "required", the forced function's name or None). No tools: "none";
    tools without tool_choice: "auto" (OpenAI's defaults); a named function: ("required", name)."""
    if not r.tools or r.tool_choice == "none":
        return "none", None
    if isinstance(r.tool_choice, ToolChoiceFunction):
        return "required", r.tool_choice.function.name
    return r.tool_choice or "auto", None


def tool_specs(r: ChatCompletionRequest) -> list[ToolSpec]:
    return [ToolSpec(t.function.name, t.function.description, t.function.parameters) for t in r.tools or ()]


def check_logit_bias(r: Any) -> None:
    """OpenAI's `logit_bias` keys are token ids written as strings of digits (ids past the
    vocabulary are the engine's 400)."""
    for key in r.logit_bias or ():
        if not _TOKEN_ID.match(key):
            raise invalid(f"Invalid key {key!r} in 'logit_bias': keys must be token ids (strings of digits).",
                          f"logit_bias.{key}")


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
    stops = [r.stop] if isinstance(r.stop, str) else r.stop or []
    if any(s == "" for s in stops):
        raise invalid("Stop sequences must not be empty strings.", "stop")
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
            values += _check_schema(tool.function.parameters, param)
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
            _check_total(values + _check_schema(fmt.json_schema.schema, "response_format.json_schema.schema"),
                         "response_format.json_schema.schema")
    if fmt is not None and fmt.type != "text" and tool_mode(r)[0] != "none":
        raise invalid("response_format json_object/json_schema cannot be combined with tool calls on this server; "
                      "use tool_choice 'none', or describe the answer as a function.", "response_format",
                      "unsupported_parameter")


def messages_for_template(r: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as the plain dicts `apply_chat_template` takes."""
    return [msgspec.to_builtins(m) for m in r.messages]


def sampling_options(r: Any) -> SamplingOptions:
    """The sampling fields of a validated request (chat or legacy completions), defaults for nulls."""
    defaults = SamplingOptions()
    return SamplingOptions(
        temperature=defaults.temperature if r.temperature is None else r.temperature,
        top_p=defaults.top_p if r.top_p is None else r.top_p,
        min_p=defaults.min_p if r.min_p is None else r.min_p,
        top_k=defaults.top_k if r.top_k is None else r.top_k,
        repetition_penalty=defaults.repetition_penalty if r.repetition_penalty is None else r.repetition_penalty,
        presence_penalty=defaults.presence_penalty if r.presence_penalty is None else r.presence_penalty,
        frequency_penalty=defaults.frequency_penalty if r.frequency_penalty is None else r.frequency_penalty,
        seed=r.seed,
        logit_bias=tuple((int(k), v) for k, v in (r.logit_bias or {}).items()),
    )


def stop_token_ids(r: Any, eos_ids: tuple[int, ...]) -> tuple[int, ...] | None:
    """The engine's stop ids for a request (chat or completions), as vLLM counts them: the model's
    EOS ids unless `ignore_eos`, plus `stop_token_ids`; None when that is just the EOS ids."""
    if not r.ignore_eos and not r.stop_token_ids:
        return None
    return tuple(sorted({*(() if r.ignore_eos else eos_ids), *(r.stop_token_ids or ())}))


def check_context(prompt_tokens: int, max_tokens: int | None, max_seq_len: int, field: str) -> None:
    """OpenAI's `context_length_exceeded` 400, in the words of the request's own `field`
    (`messages` or `prompt`)."""
    if prompt_tokens >= max_seq_len:
        raise invalid(f"This model's maximum context length is {max_seq_len} tokens. However, your {field} resulted "
                      f"in {prompt_tokens} tokens. Please reduce the length of the {field}.", field,
                      "context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > max_seq_len:
        raise invalid(f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
                      f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {field}, {max_tokens} in the "
                      f"completion). Please reduce the length of the {field} or completion.", "max_tokens",
                      "context_length_exceeded")


def engine_request(r: ChatCompletionRequest, prompt: list[int], constraint: Callable[[], Constraint] | None = None,
                   eos_ids: tuple[int, ...] = ()) -> Request:
    """The engine request for a validated API request and its templated prompt ids (and, for
    structured output, its constraint factory; `eos_ids`: the tokenizer's, for `stop_token_ids`)."""
    return Request(
        prompt=prompt,
        sampling=sampling_options(r),
        max_tokens=r.max_tokens if r.max_tokens is not None else r.max_completion_tokens,
        stop=tuple([r.stop] if isinstance(r.stop, str) else r.stop or ()),
        stop_token_ids=stop_token_ids(r, eos_ids),
        min_tokens=r.min_tokens or 0,
        n=r.n or 1,
        top_logprobs=r.top_logprobs or 0,
        constraint=constraint,
        speculative=r.speculative,
    )
