"""The Litestar app: OpenAI chat completions (plain and SSE), models, health, metrics, OpenAPI.

`create_app(engine, settings)` does not start or stop the engine: its owner does (the `serve`
command warms it up in a thread while the app already answers /health with 503).

(Over 400 lines on purpose: a chat request reads top to bottom here, from the route through
validation and submission to its reply, plain or streamed, whose helpers completions.py shares.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from litestar import Litestar, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import InternalServerException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.params import FromPath
from litestar.response import Stream
from litestar.types import Message, Scope

from api import fields, guided, responses, schemas
from api.drain import DONE, engine_error, sse_body, shutting_down
from api.errors import EXCEPTION_HANDLERS, APIError, invalid
from api.metrics import Metrics, TokenTimer
from api.offload import Offload
from api.openapi import body_operation
from api.responses import (UNSET, AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta,
                           DeltaFunction, DeltaToolCall, FunctionCallOut, Model, ModelList, TokenText, ToolCallOut,
                           encode, sse)
from api.schemas import ChatCompletionRequest
from api.settings import ServerSettings
from llama_jax import structured, tools
from llama_jax.request import EngineError, Event, QueueFullError, RequestError, RequestHandle
from llama_jax.request import Request as EngineRequest
from llama_jax.structured import Grammar, StructuredOutputError
from llama_jax.tools import ToolCallParser, ToolSpec
from llama_jax.tokenizer import ChatTemplateError, apply_chat_template

STATE_KEY = "llama_jax"
CHAT_PATHS = ["/v1/chat/completions", "/v1/openai/chat/completions"]
MODELS_PATHS = ["/v1/models", "/v1/openai/models"]
MODEL_PATHS = ["/v1/models/{model_id:path}", "/v1/openai/models/{model_id:path}"]
T = TypeVar("T")


@dataclasses.dataclass
class ServerContext:
    """What the handlers share: the engine, settings, metrics and the token renderer."""

    engine: Any  # llama_jax.engine.Engine, or anything with its serving interface
    settings: ServerSettings
    metrics: Metrics
    token_text: TokenText
    created: int
    offload: Offload = dataclasses.field(default_factory=Offload)  # the worker pool of request CPU work
    draining: bool = False  # set by the serve command's shutdown (api.shutdown): new requests get 503
    handles: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)  # accepted requests, for the drain


def _ctx(connection: ASGIConnection) -> ServerContext:
    return connection.app.state[STATE_KEY]


# ------------------------------------------------------------------------------------ auth


def require_api_key(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """App-wide guard: `Authorization: Bearer <key>` must match a configured key (constant-time
    compare) on every route but /health, and /metrics when `metrics_public` says so."""
    settings = _ctx(connection).settings
    keys = settings.api_keys
    if not keys or handler.opt.get("public") or (handler.opt.get("metrics") and settings.metrics_public):
        return
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    matches = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]  # no short-circuit
    if not any(matches):
        raise APIError(401, "Incorrect API key provided.")


# ------------------------------------------------------------------------------------ chat


def unavailable(ctx: ServerContext) -> APIError | None:
    """The 503 a chat request gets while the server cannot serve it (warming up, failed, shutting down)."""
    retry = {"Retry-After": str(max(ctx.settings.retry_after_s, 1))}
    if ctx.draining:
        return shutting_down(ctx)
    if error := getattr(ctx.engine, "error", None):
        return APIError(503, f"The engine has failed and cannot serve requests: {error}", code="engine_failed")
    if not ctx.engine.ready:
        return APIError(503, "The model is still warming up; retry in a moment.", code="model_not_ready",
                        headers=retry)
    return None


async def _read_body(request: Request, timeout_s: float) -> bytes:
    """The whole request body; 408 when it does not arrive in time, 499 when the client leaves mid-upload."""
    try:
        return await asyncio.wait_for(request.body(), timeout_s)
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout_s:g} s.",
                       code="request_timeout") from None
    except InternalServerException:  # Litestar's way of saying the client disconnected mid-body
        raise APIError(499, "The client closed the request while sending it.",
                       code="client_closed_request") from None


def _error_spec(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=responses.ErrorBody, description=description, generate_examples=False)


def completion_route(paths: list[str], reply: type, summary: str, description: str, **options: Any) -> Callable:
    """The POST decorator of a completion endpoint: its reply and error bodies in OpenAPI (the API
    key is checked app-wide by `require_api_key`)."""
    errors = {400: "invalid request (param names the field)", 401: "bad or missing key", 404: "model_not_found",
              408: "the body arrived too slowly", 413: "body too large", 429: "queue full; see Retry-After",
              503: "warming up, failed, or shutting down"}
    return post(paths, status_code=200, summary=summary, description=description,
                responses={200: ResponseSpec(reply, description=f"{reply.__name__} (or an SSE stream of chunks)",
                                             generate_examples=False),
                           **{status: _error_spec(text) for status, text in errors.items()}}, **options)


@completion_route(CHAT_PATHS, ChatCompletion, "Create a chat completion",
                  "OpenAI-compatible. With `stream: true` the body is `text/event-stream`: "
                  "`data: {chat.completion.chunk}` events, then `data: [DONE]`.",
                  operation_class=body_operation(ChatCompletionRequest,
                                                 "OpenAI chat-completions request; an unknown field is a 400 naming it."))
async def chat_completions(request: Request) -> Response:
    """Check everything that can fail, submit to the engine, then answer (or stream) the reply."""
    ctx = _ctx(request)
    timer = ctx.metrics.timer()
    require_ready(ctx)
    body = await read_request(request, ctx, ChatCompletionRequest, fields.CHAT)
    prompt, handle, mode = await start_chat(ctx, body, request.receive)
    reply = _Reply(ctx, body, handle, timer, len(prompt), tool_calls=mode != "none")
    if body.stream:
        return Stream(sse_body(ctx, reply.chunks()), media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return Response(encode(await reply.complete(request.receive)), media_type="application/json")


async def start_chat(ctx: ServerContext, body: ChatCompletionRequest,
                     receive: Callable) -> tuple[list[int], RequestHandle, str]:
    """A decoded chat request up to its submission: the model name, then in the offload pool its
    checks, prompt (chat template) and output grammar, then the engine request. Returns (prompt,
    handle, tool mode). Shared with /v1/responses (api/responses_api.py)."""
    require_model(ctx, body.model)
    prompt, grammar, mode = await unless_disconnected(ctx.offload.run(_prepare, ctx, body), receive, lambda: None)
    constraint = None
    if grammar is not None:
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        budget = max_tokens if max_tokens is not None else ctx.engine.max_seq_len - len(prompt)
        model = getattr(ctx.engine, "model", None)
        constraint = grammar.factory(budget, model.cfg.vocab_size if model is not None else None)
    handle = submit(ctx, schemas.engine_request(body, prompt, constraint, ctx.engine.tokenizer.eos_ids),
                    {"prompt": "messages"})
    return prompt, handle, mode


def _prepare(ctx: ServerContext, body: ChatCompletionRequest) -> tuple[list[int], Grammar | None, str]:
    """A decoded request's CPU work, in the offload pool (api/offload.py): its checks (JSON schemas
    included), the chat template and tokens, and its grammar. Returns (prompt ids, grammar, tool mode)."""
    schemas.check(body)
    specs, (mode, function) = schemas.tool_specs(body), schemas.tool_mode(body)
    parallel = body.parallel_tool_calls is not False and function is None
    tools_system = tools.tools_system_prompt(specs, mode, function, parallel) if specs else None
    try:
        tool_specs = [{"type": "function", "function": dataclasses.asdict(s)} for s in specs]
        prompt = apply_chat_template(ctx.engine.tokenizer, schemas.messages_for_template(body), tools_system,
                                     tool_specs)
    except ChatTemplateError as e:
        raise invalid(str(e), "messages") from None
    schemas.check_context(len(prompt), body.max_tokens or body.max_completion_tokens, ctx.engine.max_seq_len,
                          "messages")
    try:
        grammar = _grammar(ctx.engine.tokenizer, body, specs, mode, function, parallel)
    except StructuredOutputError as e:
        raise invalid(str(e), e.param, "invalid_schema") from None
    return prompt, grammar, mode


def require_ready(ctx: ServerContext) -> None:
    """503 while the server cannot serve (warming up, failed, shutting down): see `unavailable`."""
    if error := unavailable(ctx):
        raise error


async def read_body(request: Request, ctx: ServerContext) -> bytes:
    """The request body within the server's body timeout (408/499 otherwise)."""
    return await _read_body(request, ctx.settings.body_timeout_s)


LOOP_PARSE_BYTES = 64 * 1024  # bodies up to this are parsed on the event loop (well under a millisecond)


async def read_request(request: Request, ctx: ServerContext, type: type[T], policy: fields.FieldPolicy) -> T:
    """The body read and decoded as `type`, its fields beyond `type` checked by `policy` (fields.py).
    A large body is parsed in the offload pool: six 600 KB bodies take ~200 ms to parse, which on
    the loop would hold /health and every stream that long."""
    raw = await read_body(request, ctx)

    def parse() -> T:
        body = schemas.decode_struct(raw, type)
        fields.check(raw, type, policy)
        return body

    if len(raw) <= LOOP_PARSE_BYTES:
        return parse()
    return await unless_disconnected(ctx.offload.run(parse), request.receive, lambda: None)


def require_model(ctx: ServerContext, model: str) -> None:
    """404 unless the request names the served model (or one of its aliases)."""
    if model not in ctx.settings.model_names:
        names = ", ".join(f"`{name}`" for name in ctx.settings.model_names)
        raise APIError(404, f"The model `{model}` does not exist. This server serves {names}.", param="model",
                       code="model_not_found")


def submit(ctx: ServerContext, engine_request: EngineRequest, rename: Mapping[str, str] | None = None) -> RequestHandle:
    """Queue a request on the engine (from the event loop); its refusals as 400 (the engine's
    field names mapped through `rename`) or 429 with Retry-After; 503 once the server drains."""
    if ctx.draining:  # the request was read while the drain began: not accepted
        raise shutting_down(ctx)
    try:
        handle = ctx.engine.submit(engine_request, loop=asyncio.get_running_loop())
    except RequestError as e:
        raise APIError(400, str(e), param=(rename or {}).get(e.param, e.param), code=e.code) from None
    except QueueFullError as e:
        raise APIError(429, f"The server is at capacity ({e}); retry after {ctx.settings.retry_after_s} s.",
                       headers={"Retry-After": str(ctx.settings.retry_after_s)}) from None
    except EngineError:  # stopped (shutting down) or failed since the readiness check
        raise unavailable(ctx) or APIError(503, "The engine is stopped.", code="engine_failed") from None
    ctx.handles.add(handle)  # the drain waits for it
    return handle


def _grammar(tokenizer, body: ChatCompletionRequest, specs: list[ToolSpec], mode: str,
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


class _Reply:
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

    def _usage(self) -> responses.Usage:
        done = self.timer.completion_tokens
        return responses.usage(self.prompt_tokens, done, self.ctx.settings.estimated_cost(self.prompt_tokens, done),
                               self.handle.cached_tokens, (self.handle.drafted_tokens, self.handle.accepted_tokens))

    def _logprobs(self, event: Event) -> responses.ChoiceLogprobs | None:
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
                raise engine_error(self.ctx, event)
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

    def _chunk(self, choices: list[ChunkChoice], usage: responses.Usage | None = None) -> bytes:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        chunk = ChatCompletionChunk(self.id, "chat.completion.chunk", self.created, self.ctx.settings.model_name,
                                    choices, usage if include_usage else UNSET)
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
                    raise engine_error(self.ctx, event)
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
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self._chunk([], self._usage())
            yield DONE
        finally:  # also on client disconnect: Litestar cancels the stream, or the generator is closed
            if not finished:
                self.handle.cancel()
            self.timer.finish(self.prompt_tokens)


async def unless_disconnected(work: Awaitable[T], receive: Callable, cancel: Callable[[], None]) -> T:
    """The result of `work`, or (after `cancel()`) a 499 if the client disconnects first."""
    events = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({events, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not events.done():  # nobody will read the answer; 499 is for the logs and metrics
            raise APIError(499, "The client closed the request.", code="client_closed_request")
        return events.result()
    finally:
        gone.cancel()
        if not events.done():
            events.cancel()
            cancel()


async def _disconnected(receive: Callable) -> None:
    """Return once the ASGI server reports that the client went away (the body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# ------------------------------------------------------------------------------------ other routes


@get(MODELS_PATHS, summary="List the served model under each of its names")
async def list_models(request: Request) -> ModelList:
    ctx = _ctx(request)
    return ModelList("list", [Model(name, "model", ctx.created, "llama-jax") for name in ctx.settings.model_names])


@get(MODEL_PATHS, summary="Retrieve the served model by one of its names")
async def retrieve_model(request: Request, model_id: FromPath[str]) -> Model:
    ctx = _ctx(request)
    model_id = model_id.lstrip("/")
    if model_id not in ctx.settings.model_names:
        raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return Model(model_id, "model", ctx.created, "llama-jax")


_STATUS = {None: "ok", "model_not_ready": "warming up", "engine_failed": "failed",
           "server_shutting_down": "shutting down"}


@get("/health", summary="Liveness: 200 while the process can serve or is getting there (warming up, draining); "
                        "503 once the engine has failed for good (restart it)", opt={"public": True})
async def health(request: Request) -> Response[dict[str, str]]:
    error = unavailable(_ctx(request))
    return Response({"status": _STATUS[error and error.code]},
                    status_code=503 if error and error.code == "engine_failed" else 200)


@get("/ready", summary="Readiness: 200 when requests are served now; 503 while warming up, draining or failed",
     opt={"public": True})
async def ready(request: Request) -> Response[dict[str, str]]:
    error = unavailable(_ctx(request))
    return Response({"status": _STATUS[error and error.code]}, status_code=503 if error else 200)


@get("/metrics", summary="Prometheus metrics", include_in_schema=False, opt={"metrics": True})
async def metrics(request: Request) -> Response[bytes]:
    m = _ctx(request).metrics
    return Response(m.render(), media_type=m.content_type)


async def _count_response(message: Message, scope: Scope) -> None:
    """before_send hook: count every response by route and status (errors included)."""
    if message["type"] == "http.response.start":
        path = scope.get("path_template") if scope.get("route_handler") else None
        metrics = scope["app"].state[STATE_KEY].metrics
        metrics.requests.labels(metrics.model_name, path or "unmatched", str(message["status"])).inc()


def create_app(engine, settings: ServerSettings = ServerSettings()) -> Litestar:
    """An app serving `engine` (already started, or warming up elsewhere) under `settings`."""
    from api.completions import completions  # these use this module's helpers
    from api.playground import playground
    from api.responses_api import create_response
    from api.tokenize import detokenize, tokenize

    ctx = ServerContext(engine, settings, Metrics(engine, settings.model_name), TokenText(engine.tokenizer),
                        int(time.time()), Offload(settings.worker_threads))
    routes = [chat_completions, completions, create_response, tokenize, detokenize, list_models, retrieve_model,
              health, ready, metrics]
    return Litestar(
        route_handlers=[*routes, playground] if settings.playground else routes,
        state=State({STATE_KEY: ctx}),
        guards=[require_api_key],
        exception_handlers=EXCEPTION_HANDLERS,
        before_send=[_count_response],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="llama-jax", version="0.1.0", path="/schema",
                                     description="OpenAI-compatible chat completions for Llama 2 on JAX/XLA.",
                                     render_plugins=[SwaggerRenderPlugin(), JsonRenderPlugin()]),
        logging_config=None,
    )
