"""OpenAI's legacy completions API (`/v1/completions`, `/v1/openai/completions`): a raw prompt with no
chat template, `echo` and prompt `logprobs` (what lm-evaluation-harness needs for every
loglikelihood task), plain or streamed.

Prompts: a string (tokenized as the model's HF tokenizer and vLLM do: BOS first where it adds one), a list of
strings, a list of token ids (used exactly as given) or a list of token-id lists. Each prompt is
one engine request of `n` choices; choice `i * n + j` is prompt i's choice j. With `echo` a choice
starts with its prompt: text, and with `logprobs` its tokens, the first with a null logprob
(nothing predicts it), the others scored by `llama_jax.scoring` beside the generation.
The sampling fields and their checks are the chat request's own.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response
from litestar.response import Stream
from msgspec import UNSET, Meta, Struct, UnsetType

from api import fields, guided, responses, schemas
from api.app import (ServerContext, _ctx, completion_route, read_request, require_model, require_ready, submit,
                     unless_disconnected)
from api.drain import DONE, engine_error, sse_body
from api.errors import APIError, invalid
from api.metrics import TokenTimer
from api.responses import Usage, encode, sse
from api.schemas import ChatCompletionRequest
from llama_jax import scoring
from llama_jax.request import Constraint, Event, RequestHandle, TokenLogprob
from llama_jax.request import Request as EngineRequest
from llama_jax.scoring import TokenScores
from llama_jax.structured import StructuredOutputError
from llama_jax.tokenizer import Tokenizer, detokenizer

COMPLETION_PATHS = ["/v1/completions", "/v1/openai/completions"]
MAX_LOGPROBS = 5  # the legacy API's `logprobs` is at most 5
MAX_PROMPTS = 32  # prompts in one request
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this API
_SHARED = ("stream", "stream_options", "temperature", "top_p", "min_p", "top_k", "stop", "n", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "user", "seed", "logit_bias", "min_tokens", "ignore_eos",
           "stop_token_ids", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
           "guided_grammar", "speculative")  # declared (and checked) as in chat

# POST /v1/completions. null means the default; other fields: see fields.py.
CompletionRequest = msgspec.defstruct("CompletionRequest", [
    ("model", str),
    ("prompt", str | list[Any]),  # the list forms are checked by `prompt_items` (msgspec unions hold one array type)
    ("max_tokens", Annotated[int, Meta(ge=0, le=1_000_000, description="default 16; 0 only with echo")] | None, None),
    ("echo", Annotated[bool, Meta(description="return the prompt before the completion")] | None, None),
    ("logprobs", Annotated[int, Meta(ge=0, le=MAX_LOGPROBS, description="0..5 alternatives per token")] | None, None),
    ("best_of", int | None, None),
    ("suffix", str | None, None),
    *((f.name, f.type, f.default) for f in msgspec.structs.fields(ChatCompletionRequest) if f.name in _SHARED),
], kw_only=True)


def check(r: Any) -> None:
    """Rules beyond types and ranges, and the fields this server refuses."""
    stops = [r.stop] if isinstance(r.stop, str) else r.stop or []
    if "" in stops:
        raise invalid("Stop sequences must not be empty strings.", "stop")
    if r.stream_options is not None and not r.stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    if r.max_tokens == 0 and not r.echo:
        raise invalid("'max_tokens' may be 0 only with 'echo': true (to score the prompt).", "max_tokens")
    if r.suffix is not None:
        raise invalid("'suffix' is not supported: Llama 2 has no fill-in-the-middle.", "suffix", "unsupported_parameter")
    if r.best_of is not None and r.best_of != (r.n or 1):
        raise invalid("'best_of' is supported only equal to 'n'.", "best_of", "unsupported_parameter")
    schemas.check_logit_bias(r)


def prompt_items(prompt: str | list[Any]) -> list[str | list[int]]:
    """The prompts of a request: strings and token-id lists (a 400 for any other shape)."""
    is_ids = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    if isinstance(prompt, str) or is_ids(prompt):
        items = [prompt]
    elif prompt and (all(isinstance(p, str) for p in prompt) or all(is_ids(p) for p in prompt)):
        items = prompt
    else:
        raise invalid("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id "
                      "lists (none of the lists empty).", "prompt", "invalid_type")
    if len(items) > MAX_PROMPTS:
        raise invalid(f"At most {MAX_PROMPTS} prompts are allowed in one request.", "prompt")
    return items


def prompt_ids(item: str | list[int], tokenizer: Tokenizer) -> list[int]:
    """Token ids of one prompt: a string with BOS prepended (no chat template), ids as given."""
    return tokenizer.prompt_ids(item) if isinstance(item, str) else list(item)


# ------------------------------------------------------------------------------------ responses


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]  # null for the first prompt token
    top_logprobs: list[dict[str, float] | None]  # the `logprobs` likeliest tokens at each position
    text_offset: list[int]  # where each token's text starts in the choice's `text`


class CompletionChoice(Struct):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class TextCompletion(Struct, omit_defaults=True):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None | UnsetType = UNSET  # streams: only with stream_options.include_usage


class _Offsets:
    """`text_offset`s of a stream of tokens whose text starts at `start` in the choice's text."""

    def __init__(self, tokenizer: Tokenizer, start: int, after_text: bool):
        self._detok, self._at = detokenizer(tokenizer, after_text), start

    def take(self, ids: Sequence[int]) -> list[int]:
        out = []
        for t in ids:
            out.append(self._at)
            self._at += len(self._detok.add(t))
        return out


def _prompt_tokens(s: TokenScores, k: int) -> list[TokenLogprob]:
    """The scored prompt as TokenLogprobs (the first one's logprob is NaN and has no alternatives)."""
    return [TokenLogprob(int(s.token_ids[0]), float("nan"))] + [
        TokenLogprob(int(t), float(lp), tuple(zip(ids[:k].tolist(), lps[:k].tolist())))
        for t, lp, ids, lps in zip(s.token_ids[1:], s.logprobs[1:], s.top_ids[1:], s.top_logprobs[1:])]


class _Run:
    """The engine requests of one completions call, rendered as a response or as SSE chunks."""

    def __init__(self, ctx: ServerContext, body: Any, items: list[str | list[int]], ids: list[list[int]],
                 handles: list[RequestHandle], timer: TokenTimer):
        self.ctx, self.body, self.handles, self.ids, self.timer = ctx, body, handles, ids, timer
        tokenizer = ctx.engine.tokenizer
        self.n = body.n or 1
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.echo = [(i if isinstance(i, str) else tokenizer.decode(i)) if body.echo else "" for i in items]
        self.offsets = [_Offsets(tokenizer, len(self.echo[p]), _continues(tokenizer, ids[p]))
                        for p in range(len(ids)) for _ in range(self.n)]
        self.scores = None
        if body.echo and body.logprobs is not None:  # scored on a worker thread while the engine generates
            self.scores = asyncio.ensure_future(asyncio.to_thread(
                scoring.score_batch, ctx.engine.model, ids, top_k=MAX_LOGPROBS, max_rows=1))

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.ids))

    def _logprobs(self, tokens: Sequence[TokenLogprob], offsets: list[int], prompt: bool) -> CompletionLogprobs:
        content = self.ctx.token_text.logprobs(tokens).content
        out = CompletionLogprobs([c.token for c in content], [c.logprob for c in content],
                                 [{t.token: t.logprob for t in c.top_logprobs} for c in content], offsets)
        if prompt:
            out.token_logprobs[0] = out.top_logprobs[0] = None
        return out

    async def _echo(self, prompt: int) -> CompletionLogprobs | None:
        """The echoed prompt's logprobs (None without `logprobs`, empty without `echo`)."""
        if self.body.logprobs is None:
            return None
        if self.scores is None:
            return CompletionLogprobs([], [], [], [])
        tokens = _prompt_tokens((await self.scores)[prompt], self.body.logprobs)
        offsets = _Offsets(self.ctx.engine.tokenizer, 0, False).take(self.ids[prompt])
        return self._logprobs(tokens, offsets, prompt=True)

    def _generated(self, index: int, tokens: Sequence[TokenLogprob]) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        return self._logprobs(tokens, self.offsets[index].take([t.token_id for t in tokens]), prompt=False)

    async def _events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every prompt's events as they come, as (choice index, event); an engine failure raises."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(prompt: int, handle: RequestHandle) -> None:
            async for event in handle:
                await queue.put((prompt, event))
            await queue.put((prompt, None))

        tasks = [asyncio.ensure_future(pump(p, h)) for p, h in enumerate(self.handles)]
        try:
            for _ in tasks:
                while (item := await queue.get())[1] is not None:
                    prompt, event = item
                    if event.error:
                        raise engine_error(self.ctx, event)
                    self.timer.tokens(prompt * self.n + event.choice, len(event.tokens))
                    yield prompt * self.n + event.choice, event
        finally:
            for task in tasks:
                task.cancel()

    def _usage(self) -> Usage:
        done = self.timer.completion_tokens
        return responses.usage(self.prompt_tokens, done, self.ctx.settings.estimated_cost(self.prompt_tokens, done),
                               sum(h.cached_tokens for h in self.handles),
                               tuple(sum(getattr(h, f) for h in self.handles) for f in ("drafted_tokens", "accepted_tokens")))

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def complete(self, receive: Callable) -> TextCompletion:
        """Wait for every choice; cancel the engine requests if the client disconnects first."""
        try:
            return await unless_disconnected(self._collect(), receive, self.cancel)
        finally:
            self.timer.finish(self.prompt_tokens)

    async def _collect(self) -> TextCompletion:
        count = len(self.handles) * self.n
        texts, tokens, finish = [""] * count, [[] for _ in range(count)], [None] * count
        async for index, event in self._events():
            texts[index] += event.text
            tokens[index].extend(event.tokens)
            finish[index] = event.finish_reason or finish[index]
        choices = []
        for index in range(count):
            prompt, generated = index // self.n, self._generated(index, tokens[index])
            logprobs = await self._echo(prompt)
            if logprobs is not None:
                logprobs = CompletionLogprobs(*(a + b for a, b in zip(msgspec.structs.astuple(logprobs),
                                                                      msgspec.structs.astuple(generated))))
            choices.append(CompletionChoice(self.echo[prompt] + texts[index], index, logprobs, finish[index]))
        return TextCompletion(self.id, "text_completion", self.created, self.ctx.settings.model_name, choices,
                              self._usage())

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        return sse(encode(TextCompletion(self.id, "text_completion", self.created, self.ctx.settings.model_name,
                                         choices, usage if include_usage else UNSET)))

    async def chunks(self) -> AsyncIterator[bytes]:
        """SSE body: with `echo`, the prompt of each choice first; then text as it is generated (the
        finish_reason on a choice's last chunk), the usage chunk when asked for, then [DONE]. An
        engine failure raises (`sse_body` makes it an error event, and [DONE] when the drain ended it)."""
        finished = False
        try:
            if self.body.echo:
                for index in range(len(self.handles) * self.n):
                    prompt = index // self.n
                    yield self._chunk([CompletionChoice(self.echo[prompt], index, await self._echo(prompt), None)])
            async for index, event in self._events():
                logprobs = self._generated(index, event.tokens)
                yield self._chunk([CompletionChoice(event.text, index, logprobs, event.finish_reason)])
            finished = True
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self._chunk([], self._usage())
            yield DONE
        finally:  # also on client disconnect
            if not finished:
                self.cancel()
            self.timer.finish(self.prompt_tokens)


def _continues(tokenizer: Tokenizer, ids: Sequence[int]) -> bool:
    """Whether the completion's text follows visible prompt text (then its leading space stays)."""
    return any(0 <= t < tokenizer.vocab_size and not tokenizer.is_control(t) for t in ids)  # range: checked later


def engine_request(body: Any, ids: list[int], tokenizer: Tokenizer,
                   constraint: Callable[[], Constraint] | None = None) -> EngineRequest:
    """The engine request of one prompt (with its structured-output constraint factory, if any)."""
    return EngineRequest(
        prompt=ids, sampling=schemas.sampling_options(body),
        max_tokens=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
        stop=tuple([body.stop] if isinstance(body.stop, str) else body.stop or ()), n=body.n or 1,
        stop_token_ids=schemas.stop_token_ids(body, tokenizer.eos_ids), min_tokens=body.min_tokens or 0,
        top_logprobs=body.logprobs or 0, continues_prompt=_continues(tokenizer, ids), constraint=constraint,
        speculative=body.speculative)


def _prepare(ctx: ServerContext, body: Any, items: list[str | list[int]]
             ) -> tuple[list[list[int]], list[Callable[[], Constraint] | None]]:
    """A request's CPU work, in the offload pool (api/offload.py): each prompt's ids, and for a
    `structured_outputs`/`guided_*` request each prompt's constraint factory (Nones without), one
    grammar per prompt (a prompt that continues visible text gets no optional leading space)."""
    tokenizer, model = ctx.engine.tokenizer, getattr(ctx.engine, "model", None)
    ids = [prompt_ids(item, tokenizer) for item in items]
    if (spec := guided.spec(body)) is None:
        return ids, [None] * len(ids)
    budget = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    factories = []
    for prompt in ids:
        try:
            grammar = guided.grammar(tokenizer, spec, _continues(tokenizer, prompt))
        except StructuredOutputError as e:
            raise invalid(str(e), e.param, "invalid_schema") from None
        factories.append(grammar.factory(budget, model.cfg.vocab_size if model is not None else None))
    return ids, factories


@completion_route(COMPLETION_PATHS, TextCompletion, "Create a completion (legacy API)",
                  "OpenAI's legacy completions: a raw prompt (no chat template), `echo` and prompt `logprobs`. "
                  "With `stream: true` the body is `text/event-stream`: `data: {text_completion}` events, "
                  "then `data: [DONE]`.")
async def completions(request: Request) -> Response:
    """Check everything that can fail, submit every prompt to the engine, then answer (or stream)."""
    ctx = _ctx(request)
    timer = ctx.metrics.timer()
    require_ready(ctx)
    body = await read_request(request, ctx, CompletionRequest, fields.COMPLETIONS)
    check(body)
    require_model(ctx, body.model)
    items = prompt_items(body.prompt)
    ids, factories = await unless_disconnected(ctx.offload.run(_prepare, ctx, body, items), request.receive,
                                               lambda: None)  # tokens and grammars: in the pool, off the loop
    handles: list[RequestHandle] = []
    try:
        for prompt, constraint in zip(ids, factories):
            handles.append(submit(ctx, engine_request(body, prompt, ctx.engine.tokenizer, constraint)))
    except APIError:  # one refused prompt refuses the request: the queued ones are withdrawn
        for handle in handles:
            handle.cancel()
        raise
    run = _Run(ctx, body, items, ids, handles, timer)
    if body.stream:
        return Stream(sse_body(ctx, run.chunks()), media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return Response(encode(await run.complete(request.receive)), media_type="application/json")
