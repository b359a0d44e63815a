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
from typing import Any

import msgspec
from litestar import Request, Response
from msgspec import UNSET

from api import fields, guided, validation
from api.context import ServerContext, accept_request, unless_disconnected
from api.errors import APIError, invalid
from api.metrics import TokenTimer
from api.openapi import completion_route
from api.protocol import MAX_LOGPROBS, CompletionChoice, CompletionLogprobs, CompletionRequest, TextCompletion, Usage
from api.replies import DONE, encode, respond, sse, usage
from llama_jax import scoring
from llama_jax.request import Constraint, Event, RequestHandle, TokenLogprob
from llama_jax.request import Request as EngineRequest
from llama_jax.scoring import TokenScores
from llama_jax.structured import StructuredOutputError
from llama_jax.tokenizer import Tokenizer, detokenizer

COMPLETION_PATHS = ["/v1/completions", "/v1/openai/completions"]
MAX_PROMPTS = 32  # prompts in one request
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this API


def check(r: CompletionRequest) -> None:
    """Rules beyond types and ranges, and the fields this server refuses."""
    validation.check_stops(r)
    if r.stream_options is not None and not r.stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    if r.max_tokens == 0 and not r.echo:
        raise invalid("'max_tokens' may be 0 only with 'echo': true (to score the prompt).", "max_tokens")
    if r.suffix is not None:
        raise invalid("'suffix' is not supported: Llama 2 has no fill-in-the-middle.", "suffix", "unsupported_parameter")
    if r.best_of is not None and r.best_of != (r.n or 1):
        raise invalid("'best_of' is supported only equal to 'n'.", "best_of", "unsupported_parameter")
    validation.check_logit_bias(r)


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

    def __init__(self, ctx: ServerContext, body: CompletionRequest, items: list[str | list[int]], ids: list[list[int]],
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
                scoring.score_batch, ctx.engine.model, ids, top_k=MAX_LOGPROBS, max_rows=1,
                programs=ctx.scoring_programs))

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
                        raise self.ctx.engine_error(event)
                    self.timer.tokens(prompt * self.n + event.choice, len(event.tokens))
                    yield prompt * self.n + event.choice, event
        finally:
            for task in tasks:
                task.cancel()

    def _usage(self) -> Usage:
        done = self.timer.completion_tokens
        return usage(self.prompt_tokens, done, self.ctx.settings.estimated_cost(self.prompt_tokens, done),
                     sum(h.cached_tokens for h in self.handles),
                     (sum(h.drafted_tokens for h in self.handles), sum(h.accepted_tokens for h in self.handles)))

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

    def _chunk(self, choices: list[CompletionChoice], totals: Usage | None = None) -> bytes:
        return sse(encode(TextCompletion(self.id, "text_completion", self.created, self.ctx.settings.model_name,
                                         choices, totals if self.body.include_usage() else UNSET)))

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
            if self.body.include_usage():
                yield self._chunk([], self._usage())
            yield DONE
        finally:  # also on client disconnect
            if not finished:
                self.cancel()
            self.timer.finish(self.prompt_tokens)


def _continues(tokenizer: Tokenizer, ids: Sequence[int]) -> bool:
    """Whether the completion's text follows visible prompt text (then its leading space stays)."""
    return any(0 <= t < tokenizer.vocab_size and not tokenizer.is_control(t) for t in ids)  # range: checked later


def engine_request(body: CompletionRequest, ids: list[int], tokenizer: Tokenizer,
                   constraint: Callable[[], Constraint] | None = None) -> EngineRequest:
    """The engine request of one prompt (with its structured-output constraint factory, if any)."""
    return EngineRequest(
        prompt=ids, sampling=body.sampling_options(),
        max_tokens=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
        stop=body.stops(), n=body.n or 1,
        stop_token_ids=body.stop_ids(tokenizer.eos_ids), min_tokens=body.min_tokens or 0,
        top_logprobs=body.logprobs or 0, continues_prompt=_continues(tokenizer, ids), constraint=constraint,
        speculative=body.speculative)


def _prepare(ctx: ServerContext, body: CompletionRequest, items: list[str | list[int]]
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
    ctx, body, timer = await accept_request(request, CompletionRequest, fields.COMPLETIONS)
    check(body)
    ctx.require_model(body.model)
    items = prompt_items(body.prompt)
    ids, factories = await unless_disconnected(ctx.offload.run(_prepare, ctx, body, items), request.receive,
                                               lambda: None)  # tokens and grammars: in the pool, off the loop
    handles: list[RequestHandle] = []
    try:
        for prompt, constraint in zip(ids, factories):
            handles.append(ctx.submit(engine_request(body, prompt, ctx.engine.tokenizer, constraint)))
    except APIError:  # one refused prompt refuses the request: the queued ones are withdrawn
        for handle in handles:
            handle.cancel()
        raise
    return await respond(_Run(ctx, body, items, ids, handles, timer), bool(body.stream), request.receive)
