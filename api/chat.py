"""`POST /v1/chat/completions` (and `/v1/openai/chat/completions`): a chat request from its decoded
body to its reply, plain or streamed. `start_chat` (checks, chat template, grammar, submission) is
shared with the Responses API (api/responses.py); `ChatReply` renders one engine request's events.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Callable

import msgspec
from litestar import Request, Response
from msgspec import UNSET

from api import fields, guided, validation
from api.context import ServerContext, accept_request, unless_disconnected
from api.errors import invalid
from api.metrics import TokenTimer
from api.openapi import body_operation, completion_route
from api.protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                          ChoiceLogprobs, ChunkChoice, Delta, DeltaFunction, DeltaToolCall, FunctionCallOut,
                          ToolCallOut, Usage)
from api.replies import DONE, encode, respond, sse, usage
from llama_jax import structured, tools
from llama_jax.request import Constraint, Event, RequestHandle
from llama_jax.request import Request as EngineRequest
from llama_jax.structured import Grammar, StructuredOutputError
from llama_jax.tokenizer import ChatTemplateError, Tokenizer, apply_chat_template
from llama_jax.tools import ToolCallParser, ToolSpec

CHAT_PATHS = ["/v1/chat/completions", "/v1/openai/chat/completions"]


@completion_route(CHAT_PATHS, ChatCompletion, "Create a chat completion",
                  "OpenAI-compatible. With `stream: true` the body is `text/event-stream`: "
                  "`data: {chat.completion.chunk}` events, then `data: [DONE]`.",
                  operation_class=body_operation(ChatCompletionRequest,
                                                 "OpenAI chat-completions request; an unknown field is a 400 naming it."))
async def chat_completions(request: Request) -> Response:
    """Check everything that can fail, submit to the engine, then answer (or stream) the reply."""
    ctx, body, timer = await accept_request(request, ChatCompletionRequest, fields.CHAT)
    prompt, handle, mode = await start_chat(ctx, body, request.receive)
    reply = ChatReply(ctx, body, handle, timer, len(prompt), tool_calls=mode != "none")
    return await respond(reply, bool(body.stream), request.receive)


async def start_chat(ctx: ServerContext, body: ChatCompletionRequest,
                     receive: Callable) -> tuple[list[int], RequestHandle, str]:
    """A decoded chat request up to its submission: the model name, then in the offload pool its
    checks, prompt (chat template) and output grammar, then the engine request. Returns (prompt,
    handle, tool mode)."""
    ctx.require_model(body.model)
    prompt, grammar, mode = await unless_disconnected(ctx.offload.run(_prepare, ctx, body), receive, lambda: None)
    constraint = None
    if grammar is not None:
        max_tokens = body.max_new_tokens()
        budget = max_tokens if max_tokens is not None else ctx.engine.max_seq_len - len(prompt)
        model = getattr(ctx.engine, "model", None)
        constraint = grammar.factory(budget, model.cfg.vocab_size if model is not None else None)
    handle = ctx.submit(engine_request(body, prompt, constraint, ctx.engine.tokenizer.eos_ids), {"prompt": "messages"})
    return prompt, handle, mode


def engine_request(r: ChatCompletionRequest, prompt: list[int], constraint: Callable[[], Constraint] | None = None,
                   eos_ids: tuple[int, ...] = ()) -> EngineRequest:
    """The engine request for a validated chat request and its templated prompt ids (and, for
    structured output, its constraint factory; `eos_ids`: the tokenizer's, for `stop_token_ids`)."""
    return EngineRequest(prompt=prompt, sampling=r.sampling_options(), max_tokens=r.max_new_tokens(), stop=r.stops(),
                         stop_token_ids=r.stop_ids(eos_ids), min_tokens=r.min_tokens or 0, n=r.n or 1,
                         top_logprobs=r.top_logprobs or 0, constraint=constraint,
                         speculative=r.speculative)


def _prepare(ctx: ServerContext, body: ChatCompletionRequest) -> tuple[list[int], Grammar | None, str]:
    """A decoded request's CPU work, in the offload pool (api/offload.py): its checks (JSON schemas
    included), the chat template and tokens, and its grammar. Returns (prompt ids, grammar, tool mode)."""
    validation.check(body)
    specs, (mode, function) = body.tool_specs(), body.tool_mode()
    parallel = body.parallel_tool_calls is not False and function is None
    tools_system = tools.tools_system_prompt(specs, mode, function, parallel) if specs else None
    try:
        tool_specs = [{"type": "function", "function": dataclasses.asdict(s)} for s in specs]
        messages = [msgspec.to_builtins(m) for m in body.messages]
        prompt = apply_chat_template(ctx.engine.tokenizer, messages, tools_system, tool_specs)
    except ChatTemplateError as e:
        raise invalid(str(e), "messages") from None
    check_context(len(prompt), body.max_new_tokens(), ctx.engine.max_seq_len, "messages")
    try:
        grammar = _grammar(ctx.engine.tokenizer, body, specs, mode, function, parallel)
    except StructuredOutputError as e:
        raise invalid(str(e), e.param, "invalid_schema") from None
    return prompt, grammar, mode


def check_context(prompt_tokens: int, max_tokens: int | None, max_seq_len: int, field: str) -> None:
    """OpenAI's `context_length_exceeded` 400, in the words of the request's own `field`."""
    if prompt_tokens >= max_seq_len:
        raise invalid(f"This model's maximum context length is {max_seq_len} tokens. However, your {field} resulted "
                      f"in {prompt_tokens} tokens. Please reduce the length of the {field}.", field,
                      "context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > max_seq_len:
        raise invalid(f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
                      f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {field}, {max_tokens} in the "
                      f"completion). Please reduce the length of the {field} or completion.", "max_tokens",
                      "context_length_exceeded")


def _grammar(tokenizer: Tokenizer, body: ChatCompletionRequest, specs: list[ToolSpec], mode: str,
             function: str | None, parallel: bool) -> Grammar | None:
    """The output grammar of a request: a `structured_outputs`/`guided_*` constraint (guided.py), the
    tool-call envelope, a JSON schema, or None (free text)."""
    if (constraint := guided.spec(body, tool_calls=mode != "none")) is not None:
        return guided.grammar(tokenizer, constraint)
    if mode != "none":
        structured.check_tools(tokenizer, specs)
        chosen = [t for t in specs if t.name == function] if function else specs
        return structured.tools_grammar(tokenizer, chosen, mode, parallel)
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        return structured.json_grammar(tokenizer, None, "response_format")
    if fmt is not None and fmt.type == "json_schema":
        return structured.json_grammar(tokenizer, fmt.json_schema.schema, "response_format.json_schema.schema")
    return None


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ChatReply:
    """Turns one engine request's events into an OpenAI response or SSE chunks. With tools, each
    choice's text goes through a ToolCallParser: an envelope becomes `tool_calls` (streamed as
    index/id/name, then argument fragments as they are generated) and finish_reason
    "tool_calls"; a plain-text answer (tool_choice auto) stays `content`."""

    def __init__(self, ctx: ServerContext, body: ChatCompletionRequest, handle: RequestHandle, timer: TokenTimer,
                 prompt_tokens: int, tool_calls: bool = False):
        self.ctx, self.body, self.handle, self.timer = ctx, body, handle, timer
        self.prompt_tokens = prompt_tokens
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        n = handle.request.n
        self.parsers = [ToolCallParser() for _ in range(n)] if tool_calls else None
        self.call_ids: list[list[str]] = [[] for _ in range(n)]

    def _finish_reason(self, choice: int, reason: str | None) -> str | None:
        if reason == "stop" and self.parsers and self.parsers[choice].calls and self.parsers[choice].complete:
            return "tool_calls"
        return reason

    def _message(self, choice: int, text: str) -> AssistantMessage:
        if self.parsers is None:
            return AssistantMessage("assistant", text)
        parser = self.parsers[choice]
        parser.feed(text)
        if parser.mode != "calls" or not parser.calls:
            return AssistantMessage("assistant", text)
        calls = [ToolCallOut(_call_id(), "function", FunctionCallOut(c.name, c.arguments)) for c in parser.calls]
        return AssistantMessage("assistant", None, calls)

    def _deltas(self, choice: int, text: str) -> list[Delta]:
        """Stream deltas for new text of a choice."""
        if self.parsers is None:
            return [Delta(content=text)] if text else []
        deltas = []
        for kind, *rest in self.parsers[choice].feed(text):
            if kind == "content":
                deltas.append(Delta(content=rest[0]))
            elif kind == "call":
                index, name = rest
                self.call_ids[choice].append(_call_id())
                deltas.append(Delta(tool_calls=[DeltaToolCall(index, self.call_ids[choice][index], "function",
                                                              DeltaFunction(name, ""))]))
            else:
                index, fragment = rest
                deltas.append(Delta(tool_calls=[DeltaToolCall(index, function=DeltaFunction(arguments=fragment))]))
        return deltas

    def _usage(self) -> Usage:
        done = self.timer.completion_tokens
        return usage(self.prompt_tokens, done, self.ctx.settings.estimated_cost(self.prompt_tokens, done),
                     self.handle.cached_tokens, (self.handle.drafted_tokens, self.handle.accepted_tokens))

    def _logprobs(self, event: Event) -> ChoiceLogprobs | None:
        return self.ctx.token_text.logprobs(event.tokens) if self.body.logprobs else None

    async def complete(self, receive: Callable) -> ChatCompletion:
        """Wait for every choice; cancel the engine request if the client disconnects first."""
        try:
            return await unless_disconnected(self._events(), receive, self.handle.cancel)
        finally:
            self.timer.finish(self.prompt_tokens)

    async def _events(self) -> ChatCompletion:
        n = self.handle.request.n
        texts, tokens, finish = [""] * n, [[] for _ in range(n)], [None] * n
        async for event in self.handle:
            if event.error:
                raise self.ctx.engine_error(event)
            self.timer.tokens(event.choice, len(event.tokens))
            texts[event.choice] += event.text
            tokens[event.choice].extend(event.tokens)
            finish[event.choice] = event.finish_reason or finish[event.choice]
        choices = [Choice(i, self._message(i, texts[i]),
                          self.ctx.token_text.logprobs(tokens[i]) if self.body.logprobs else None,
                          self._finish_reason(i, finish[i]))
                   for i in range(n)]
        return ChatCompletion(self.id, "chat.completion", self.created, self.ctx.settings.model_name, choices,
                              self._usage())

    def _chunk(self, choices: list[ChunkChoice], totals: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(self.id, "chat.completion.chunk", self.created, self.ctx.settings.model_name,
                                    choices, totals if self.body.include_usage() else UNSET)
        return sse(encode(chunk))

    async def chunks(self) -> AsyncIterator[bytes]:
        """SSE body: a role chunk per choice, content chunks as tokens arrive, a finish chunk per
        choice, the usage chunk when asked for, then [DONE]. An engine failure raises (`sse_body`
        makes it an error event, and [DONE] when the drain ended the request)."""
        finished = False
        try:
            for i in range(self.handle.request.n):
                yield self._chunk([ChunkChoice(i, Delta(role="assistant", content=""))])
            async for event in self.handle:
                if event.error:
                    raise self.ctx.engine_error(event)
                self.timer.tokens(event.choice, len(event.tokens))
                logprobs = self._logprobs(event)
                deltas = self._deltas(event.choice, event.text)
                if not deltas and logprobs and event.tokens:
                    deltas = [Delta(content="")] if self.parsers is None else [Delta()]
                for k, delta in enumerate(deltas):  # the logprobs ride on the event's first chunk
                    yield self._chunk([ChunkChoice(event.choice, delta, logprobs if k == 0 else None)])
                if event.finish_reason:
                    parser = self.parsers[event.choice] if self.parsers else None
                    if parser and parser.mode == "calls" and not parser.calls:  # cut before any call: as text
                        yield self._chunk([ChunkChoice(event.choice, Delta(content=parser.text))])
                    reason = self._finish_reason(event.choice, event.finish_reason)
                    yield self._chunk([ChunkChoice(event.choice, Delta(), None, reason)])
            finished = True
            if self.body.include_usage():
                yield self._chunk([], self._usage())
            yield DONE
        finally:  # also on client disconnect: Litestar cancels the stream, or the generator is closed
            if not finished:
                self.handle.cancel()
            self.timer.finish(self.prompt_tokens)
