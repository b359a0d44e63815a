"""`POST /v1/responses` (and `/v1/openai/responses`): OpenAI's Responses API, stateless, over the
chat pipeline (chat.start_chat: the same template, grammars, tools and engine request).

The request's `input` (a string, or message / `function_call` / `function_call_output` items),
`instructions`, `max_output_tokens`, `temperature`, `top_p`, `text.format` (text, json_object,
json_schema), function `tools`, `tool_choice` and `parallel_tool_calls` become a chat request;
errors name the Responses field (`input`, `max_output_tokens`, `text.format.schema`, ...).
Nothing is stored: `previous_response_id` and `store: true` are refused with a 400, as are the
other options this server does not implement (fields.py and `check`).

The reply is a `response` object whose `output` holds one `message` (with one `output_text`) or
the `function_call` items; streamed, the typed events `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta` (or
`response.function_call_arguments.delta`), the matching `.done` events, then
`response.completed` (`response.incomplete` when max_output_tokens cut it). An engine failure
after the headers is an `error` event, then `response.failed`, and the stream ends.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response
from msgspec import Meta, Struct

from api import fields, validation
from api.chat import start_chat
from api.context import ServerContext, accept_request, unless_disconnected
from api.errors import APIError, invalid
from api.metrics import TokenTimer
from api.openapi import body_operation, completion_route
from api.protocol import SPECULATIVE_DOC, ChatCompletionRequest, Name
from api.replies import respond
from llama_jax.request import RequestHandle
from llama_jax.tools import ToolCallParser

RESPONSES_PATHS = ["/v1/responses", "/v1/openai/responses"]
_PART_TYPES = ("input_text", "output_text", "text")


# ------------------------------------------------------------------------------------ request


class FunctionTool(Struct, kw_only=True):
    type: Literal["function"]
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of type object
    strict: bool | None = None  # accepted; arguments always follow the schema here


class ToolChoiceFunction(Struct, kw_only=True):
    type: Literal["function"]
    name: str


class TextFormat(Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    name: Name | None = None  # json_schema
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    format: TextFormat | None = None


class ResponsesRequest(Struct, kw_only=True):
    """POST /v1/responses. null means the default."""

    model: Annotated[str, Meta(description="a served model name")]
    input: Annotated[str | list[dict[str, Any]], Meta(description="text, or message / function_call / "
                                                                  "function_call_output items")]
    instructions: Annotated[str, Meta(description="a system message before the input")] | None = None
    max_output_tokens: Annotated[int, Meta(ge=1, le=1_000_000, description="default: the rest of the "
                                                                           "context")] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2, description="default 1; 0 is greedy")] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1, description="default 1")] | None = None
    text: TextConfig | None = None
    tools: Annotated[list[FunctionTool], Meta(description="function tools only")] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: Annotated[bool, Meta(description="false: at most one call")] | None = None
    stream: bool | None = None
    store: Annotated[bool, Meta(description="only false: nothing is stored")] | None = None
    previous_response_id: Annotated[str, Meta(description="refused: the server is stateless")] | None = None
    metadata: Annotated[dict[str, str], Meta(max_length=16, description="echoed back")] | None = None
    user: str | None = None
    background: Annotated[bool, Meta(description="only false")] | None = None
    include: Annotated[list[str], Meta(description="only empty")] | None = None
    truncation: Annotated[Literal["auto", "disabled"], Meta(description="only disabled")] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20, description="only 0")] | None = None
    speculative: Annotated[bool, Meta(description=SPECULATIVE_DOC)] | None = None


class ResponseObject(Struct):
    """The `response` object (documented shape; built as plain JSON by `_Run`)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None


def check(r: ResponsesRequest) -> None:
    """The options this stateless server refuses (400 naming them)."""
    refusals = (
        ("previous_response_id", r.previous_response_id is not None,
         "This server is stateless and stores no responses: send the whole conversation in 'input'."),
        ("store", r.store is True, "This server stores nothing: 'store' may only be false."),
        ("background", r.background is True, "Background responses are not supported: 'background' may only be false."),
        ("include", bool(r.include), "'include' is not supported (nothing extra can be included)."),
        ("truncation", r.truncation == "auto", "'truncation: auto' is not supported: an input longer than the "
                                               "context is a 400."),
        ("top_logprobs", bool(r.top_logprobs), "'top_logprobs' is not supported on /v1/responses; use "
                                               "/v1/chat/completions."),
    )
    for param, refused, message in refusals:
        if refused:
            raise invalid(message, param, "unsupported_parameter")


def _content(content: Any, param: str) -> str | list[dict[str, str]]:
    """A message's content as chat content: text parts only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid("Content must be a string or a list of input_text parts.", param, "invalid_type")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _PART_TYPES or not isinstance(part.get("text"), str):
            raise invalid(f"Content part type {kind!r} is not supported: only text parts are.", f"{param}[{j}].type",
                          "unsupported_parameter")
        parts.append({"type": "text", "text": part["text"]})
    return parts


def _field(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise invalid(f"Missing required parameter: '{param}.{name}' (a string).", f"{param}.{name}",
                      "missing_required_parameter")
    return value


def chat_messages(r: ResponsesRequest, origin: list[Any]) -> list[dict[str, Any]]:
    """`instructions` and `input` as chat messages: a run of function_call items becomes one
    assistant message with tool_calls, a function_call_output a tool message. `origin` gets, per
    message, the Responses field it came from (a list of them for merged calls), for `_renamed`."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": r.instructions}] if r.instructions else []
    origin += ["instructions"] * len(messages)
    if isinstance(r.input, str):
        origin.append("input")
        return [*messages, {"role": "user", "content": r.input}]
    if not r.input:
        raise invalid("'input' must not be empty.", "input")
    for i, item in enumerate(r.input):
        param, kind = f"input[{i}]", item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(f"Unsupported role {role!r}: user, system, developer or assistant.", f"{param}.role")
            messages.append({"role": role, "content": _content(item.get("content"), f"{param}.content")})
            origin.append(param)
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", param), "type": "function",
                    "function": {"name": _field(item, "name", param), "arguments": _field(item, "arguments", param)}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") and last["content"] is None:
                last["tool_calls"].append(call)
                origin[-1].append(param)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                origin.append([param])
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _content(output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", param), "content": content})
            origin.append(param)
        else:
            raise invalid(f"Input items of type {kind!r} are not supported: message, function_call and "
                          "function_call_output are.", f"{param}.type", "unsupported_parameter")
    return messages


def to_chat(r: ResponsesRequest, origin: list[Any]) -> ChatCompletionRequest:
    """The equivalent checked chat request (errors name chat fields: see `_renamed`)."""
    fmt = r.text.format if r.text is not None else None
    response_format = None
    if fmt is not None:
        response_format = {"type": fmt.type}
        if fmt.type == "json_schema":
            response_format["json_schema"] = {k: v for k, v in (("name", fmt.name), ("schema", fmt.schema),
                                                                 ("description", fmt.description),
                                                                 ("strict", fmt.strict)) if v is not None}
    choice = r.tool_choice
    chat = {
        "model": r.model, "messages": chat_messages(r, origin), "max_tokens": r.max_output_tokens,
        "temperature": r.temperature, "top_p": r.top_p, "user": r.user, "response_format": response_format,
        "tools": [{"type": "function", "function": {k: v for k, v in msgspec.to_builtins(t).items() if k != "type"}}
                  for t in r.tools] if r.tools else None,
        "tool_choice": {"type": "function", "function": {"name": choice.name}}
        if isinstance(choice, ToolChoiceFunction) else choice,
        "parallel_tool_calls": r.parallel_tool_calls if r.tools else None, "speculative": r.speculative,
    }
    try:
        body = msgspec.convert({k: v for k, v in chat.items() if v is not None}, ChatCompletionRequest)
    except msgspec.ValidationError as e:
        raise validation.validation_error(e) from None
    return body


_MESSAGE = re.compile(r"^messages\[(\d+)\](.*)$")
_CALL = re.compile(r"^\.tool_calls\[(\d+)\](.*)$")
_ITEM_FIELDS = {".tool_call_id": ".call_id", ".function.name": ".name", ".function.arguments": ".arguments",
                ".id": ".call_id"}
_RENAMES = ((re.compile(r"^messages$"), "input"), (re.compile(r"^max_tokens$"), "max_output_tokens"),
            (re.compile(r"^response_format\.json_schema\.schema"), "text.format.schema"),
            (re.compile(r"^response_format(\.json_schema)?"), "text.format"),
            (re.compile(r"^tools\[(\d+)\]\.function\."), r"tools[\1]."))


def responses_param(param: str, origin: list[Any]) -> str:
    """A chat request's field as the Responses request's (`origin`: see `chat_messages`)."""
    if (m := _MESSAGE.match(param)) is not None:
        k, rest = int(m.group(1)), m.group(2)
        where = origin[k] if k < len(origin) else "input"
        if isinstance(where, list):  # an assistant message merged from function_call items
            call = _CALL.match(rest)
            where, rest = (where[int(call.group(1))], call.group(2)) if call and int(call.group(1)) < len(where) \
                else (where[0], "")
        return where + _ITEM_FIELDS.get(rest, rest)
    for pattern, name in _RENAMES:
        param = pattern.sub(name, param, count=1)
    return param


@contextlib.contextmanager
def _renamed(origin: list[Any]) -> Iterator[None]:
    """Errors of the chat pipeline with the Responses API's field names in `param`."""
    try:
        yield
    except APIError as e:
        if e.param:
            e.param = responses_param(e.param, origin)
        raise


# ------------------------------------------------------------------------------------ reply


def _id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


class _Run:
    """One engine request rendered as a `response` object, or as its typed SSE events. The same
    event walk builds both, so ids and output agree."""

    def __init__(self, ctx: ServerContext, r: ResponsesRequest, handle: RequestHandle, timer: TokenTimer,
                 prompt_tokens: int, tool_calls: bool):
        self.ctx, self.r, self.handle, self.timer, self.prompt_tokens = ctx, r, handle, timer, prompt_tokens
        self.id, self.created = _id("resp_"), int(time.time())
        self.parser = ToolCallParser() if tool_calls else None
        self.items: list[dict[str, Any]] = []  # output items, in order
        self.message: dict[str, Any] | None = None  # the open message item
        self.call: dict[str, Any] | None = None  # the open function_call item
        self.call_index = 0  # its index among the parser's calls
        self.text = ""
        self.sequence = -1
        self.final: dict[str, Any] | None = None

    def snapshot(self, status: str, error: dict[str, str] | None = None) -> dict[str, Any]:
        r, done = self.r, status in ("completed", "incomplete", "failed")
        usage = None
        if done:
            out, drafted, accepted = self.timer.completion_tokens, self.handle.drafted_tokens, self.handle.accepted_tokens
            details = {"reasoning_tokens": 0} | ({"accepted_prediction_tokens": accepted,  # chat's names for drafts
                                                  "rejected_prediction_tokens": drafted - accepted} if drafted else {})
            usage = {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens":
                                                                                  self.handle.cached_tokens},
                     "output_tokens": out, "output_tokens_details": details, "total_tokens": self.prompt_tokens + out}
        choice = r.tool_choice
        fmt = r.text.format if r.text is not None and r.text.format is not None else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
            "model": self.ctx.settings.model_name, "output": msgspec.to_builtins(self.items) if done else [],
            "parallel_tool_calls": r.parallel_tool_calls is not False, "previous_response_id": None,
            "temperature": 1.0 if r.temperature is None else r.temperature, "top_p": 1.0 if r.top_p is None else r.top_p,
            "text": {"format": msgspec.to_builtins(fmt) if fmt else {"type": "text"}},
            "tool_choice": msgspec.to_builtins(choice) if choice is not None else "auto",
            "tools": [{**msgspec.to_builtins(t), "strict": t.strict is not False} for t in r.tools or ()],
            "truncation": "disabled", "store": False, "background": False, "metadata": r.metadata or {},
            "user": r.user, "usage": usage,
        }

    def _event(self, kind: str, **payload: Any) -> tuple[str, dict[str, Any]]:
        self.sequence += 1
        return kind, {"type": kind, "sequence_number": self.sequence, **payload}

    def _open_message(self) -> Iterator[tuple[str, dict]]:
        self.message = {"id": _id("msg_"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}
        self.items.append(self.message)
        yield self._event("response.output_item.added", output_index=len(self.items) - 1, item=self.message)
        yield self._event("response.content_part.added", item_id=self.message["id"], output_index=len(self.items) - 1,
                          content_index=0, part=self._part(""))

    @staticmethod
    def _part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _close_call(self) -> Iterator[tuple[str, dict]]:
        call, self.call = self.call, None
        if call is None:
            return
        index = self.items.index(call)
        call["status"] = "completed" if self.parser.calls[self.call_index].complete else "incomplete"
        yield self._event("response.function_call_arguments.done", item_id=call["id"], output_index=index,
                          name=call["name"], arguments=call["arguments"])
        yield self._event("response.output_item.done", output_index=index, item=call)

    def _feed(self, text: str) -> Iterator[tuple[str, dict]]:
        pieces = self.parser.feed(text) if self.parser else ([("content", text)] if text else [])
        for kind, *rest in pieces:
            if kind == "content":
                if self.message is None:
                    yield from self._open_message()
                self.text += rest[0]
                yield self._event("response.output_text.delta", item_id=self.message["id"],
                                  output_index=self.items.index(self.message), content_index=0, delta=rest[0],
                                  logprobs=[])
            elif kind == "call":
                yield from self._close_call()
                self.call_index = rest[0]
                self.call = {"id": _id("fc_"), "type": "function_call", "status": "in_progress",
                             "call_id": _id("call_"), "name": rest[1], "arguments": ""}
                self.items.append(self.call)
                yield self._event("response.output_item.added", output_index=len(self.items) - 1, item=self.call)
            else:
                self.call["arguments"] += rest[1]
                yield self._event("response.function_call_arguments.delta", item_id=self.call["id"],
                                  output_index=self.items.index(self.call), delta=rest[1])

    def _finish(self, reason: str | None) -> Iterator[tuple[str, dict]]:
        yield from self._close_call()
        if not self.items:  # no visible output, or an envelope cut before its first call: as text
            yield from self._open_message()
            if rest := (self.parser.text if self.parser else ""):
                self.text = rest
                yield self._event("response.output_text.delta", item_id=self.message["id"], output_index=0,
                                  content_index=0, delta=rest, logprobs=[])
        if self.message is not None:
            index = self.items.index(self.message)
            self.message["status"] = "incomplete" if reason == "length" else "completed"
            self.message["content"] = [self._part(self.text)]
            yield self._event("response.output_text.done", item_id=self.message["id"], output_index=index,
                              content_index=0, text=self.text, logprobs=[])
            yield self._event("response.content_part.done", item_id=self.message["id"], output_index=index,
                              content_index=0, part=self._part(self.text))
            yield self._event("response.output_item.done", output_index=index, item=self.message)

    async def events(self) -> AsyncIterator[tuple[str, dict]]:
        """Every event of the response; an engine failure raises its APIError; `final` is set at the end."""
        yield self._event("response.created", response=self.snapshot("in_progress"))
        yield self._event("response.in_progress", response=self.snapshot("in_progress"))
        reason = None
        async for event in self.handle:
            if event.error:
                raise self.ctx.engine_error(event)
            self.timer.tokens(0, len(event.tokens))
            for item in self._feed(event.text):
                yield item
            reason = event.finish_reason or reason
        for item in self._finish(reason):
            yield item
        status = "incomplete" if reason == "length" else "completed"
        self.final = self.snapshot(status)
        yield self._event(f"response.{status}", response=self.final)

    async def complete(self, receive: Callable) -> dict[str, Any]:
        """The whole response; the engine request is cancelled if the client leaves first."""
        async def run() -> dict[str, Any]:
            async for _ in self.events():
                pass
            return self.final

        try:
            return await unless_disconnected(run(), receive, self.handle.cancel)
        finally:
            self.timer.finish(self.prompt_tokens)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The SSE body: `event: TYPE` and `data: {...}` per event; on an engine failure an `error`
        event and `response.failed`, then the end."""
        finished = False
        try:
            try:
                async for kind, data in self.events():
                    yield _frame(kind, data)
                finished = True
            except APIError as e:
                yield _frame(*self._event("error", code=e.code, message=e.message, param=e.param))
                failed = self.snapshot("failed", {"code": e.code, "message": e.message})
                yield _frame(*self._event("response.failed", response=failed))
        finally:  # also on client disconnect
            if not finished:
                self.handle.cancel()
            self.timer.finish(self.prompt_tokens)


def _frame(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


@completion_route(RESPONSES_PATHS, ResponseObject, "Create a model response (stateless)",
                  "OpenAI's Responses API without storage. With `stream: true` the body is `text/event-stream` "
                  "of typed events (`event: response.output_text.delta` ...), ending with `response.completed`.",
                  operation_class=body_operation(ResponsesRequest, "Responses request; an unknown field is a 400 "
                                                                   "naming it."))
async def create_response(request: Request) -> Response:
    """Check everything that can fail, submit through the chat pipeline, then answer (or stream)."""
    ctx, r, timer = await accept_request(request, ResponsesRequest, fields.RESPONSES)
    check(r)
    origin: list[Any] = []
    with _renamed(origin):
        chat = to_chat(r, origin)
        prompt, handle, mode = await start_chat(ctx, chat, request.receive)
    run = _Run(ctx, r, handle, timer, len(prompt), tool_calls=mode != "none")
    return await respond(run, bool(r.stream), request.receive)  # an engine failure is already an event here
