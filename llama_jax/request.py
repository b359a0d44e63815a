"""What a caller hands the engine and what it gets back: requests (checked by `prepared`), per-choice
events, and the handle that streams them (to plain Python or asyncio; each choice's text is made
there, in the consumer's thread: choice_text.py). A choice running in a decode slot is running.py's."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np

from llama_jax.choice_text import ChoiceStream
from llama_jax.outbox import Outbox
from llama_jax.sampling import MAX_STOP_IDS, MAX_TOP_LOGPROBS, SamplingParams, make_params, random_seed
from llama_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
MAX_CHOICES = 128  # OpenAI's limit; choices beyond the free slots wait in the queue for theirs


class RequestError(ValueError):
    """A request the engine cannot serve; `code` is the OpenAI error code the API returns."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


class QueueFullError(RuntimeError):
    """The bounded request queue is full: retry later (the API answers 429)."""


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Sampling knobs of one request, as the API gives them (validated by `sampling.make_params`)."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) pairs


class Constraint(Protocol):
    """Restricts one choice's tokens step by step (structured output): a grammar automaton."""

    def fill_mask(self, row: np.ndarray) -> None:
        """Write the tokens that may come next into `row`, int32 [ceil(vocab / 32)] packed as llguidance
        does (bitmask.py: bit i of word w is token 32w + i); raise when none can (the engine fails the choice)."""

    def advance(self, token_id: int) -> None:
        """Consume the sampled token."""

    def done(self) -> bool:
        """The output is complete: generation stops with finish_reason "stop"."""


@dataclasses.dataclass(frozen=True)
class Request:
    """A prompt (token ids) and how to continue it. `max_tokens=None` means the rest of the context."""

    prompt: Sequence[int]
    sampling: SamplingOptions = SamplingOptions()
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] | None = None  # None: the tokenizer's EOS ids; a stop id ends a choice
    min_tokens: int = 0  # the stop ids and stop strings cannot end a choice before it has this many tokens
    n: int = 1
    top_logprobs: int = 0  # alternatives reported per token (0..20); logprobs of chosen tokens always come
    constraint: Callable[[], Constraint] | None = None  # a fresh automaton per choice
    continues_prompt: bool = False  # the text continues the prompt's (raw completions): a leading space stays
    speculative: bool | None = None  # prompt-lookup speculation (speculative.py); None: the engine's default


@dataclasses.dataclass(slots=True)  # not frozen: one is made per token, and a frozen one costs 3x as much
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(slots=True)  # not frozen, like TokenLogprob: one per token
class Event:
    """Progress of one choice: new text, the tokens generated since the last event, and at the end
    a `finish_reason` ("stop" or "length"), or `error` if the engine failed this request. The engine
    thread hands a handle a plain `TokenItem` per token instead (cheaper to make there); the handle's
    iterators turn it into an Event."""

    choice: int
    text: str = ""
    tokens: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    error: str | None = None


# one sampled token from the engine thread: (choice, token id, logprob, top alternatives, finish_reason or None)
TokenItem = tuple[int, int, float, tuple[tuple[int, float], ...], str | None]


@dataclasses.dataclass
class Choice:
    text: str = ""
    tokens: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
    """Everything a request produced, for callers that do not stream."""

    choices: list[Choice]
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache (first choice)
    drafted_tokens: int = 0  # speculative draft tokens verified, all choices
    accepted_tokens: int = 0  # of those, the ones accepted

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)


class EngineError(RuntimeError):
    """The engine failed a request (the message says why); other requests keep running."""


_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class Admission:
    """One choice of a request given a decode slot: its prompt is prefilled there from `start`
    (the tokens before it are a cached prefix already in the slot)."""

    handle: RequestHandle
    choice: int
    slot: int
    start: int

    @property
    def suffix(self) -> Sequence[int]:
        return self.handle.request.prompt[self.start:]


class RequestHandle:
    """Streams a request's events, from a background engine thread to plain Python or asyncio.

    Iterate with `for` (plain Python) or `async for` (when submitted with an event loop); the
    stream ends after every choice has finished. `cancel()` frees the request's slots within one
    engine step. The engine's token items become text events here, in the consumer's thread (choice_text.py).
    """

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None = None, outbox: Outbox | None = None,
                 tokenizer: Tokenizer | None = None, stop_ids: frozenset[int] = frozenset()):
        """With an `outbox` (the engine's), events for `loop` wait there until the engine flushes it; `tokenizer`
        and `stop_ids` (the engine's) make each choice's text."""
        self.request = request
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.outbox = outbox
        self.id = next(_ids)
        self.prompt_tokens = len(request.prompt)
        self.cached_tokens = 0  # set by the engine at admission, before the first event
        self.unfinished = request.n  # choices still generating (engine thread only)
        self.admitted = 0  # choices given a slot so far (the rest wait in the queue)
        self.max_tokens = 0  # set by the engine when it accepts the request
        self.rows: list = []  # the sampling row of each choice, likewise
        self.drafted_tokens = 0  # speculative drafts verified for this request, and accepted (engine thread)
        self.accepted_tokens = 0
        self.cancelled = threading.Event()
        self.loop = loop
        self._queue: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop else queue.SimpleQueue()
        self.enqueue = self._queue.put_nowait if loop else self._queue.put  # into the consumer's queue (its thread)
        # engine thread: `put(item)` hands the consumer a TokenItem, an Event, or None (the stream's end)
        self.put: Callable[[TokenItem | Event | None], None] = self._sender()
        self._on_drop = lambda: None  # the engine's: told when the request is cancelled or a stop string ends a choice
        self.stopped: set[int] = set()  # choices a stop string ended (`ChoiceStream`): the engine frees their slots
        self._streams: dict[int, ChoiceStream] = {}
        self._failed = False

    def cancel(self) -> None:
        self.cancelled.set()
        self._on_drop()

    def waiting_choices(self, free: int) -> int:
        """How many of the choices still queued can be admitted into `free` slots (all of them
        when there is nothing to generate: they need no slot)."""
        waiting = self.request.n - self.admitted
        return waiting if self.max_tokens == 0 else min(waiting, free)

    def admit(self, take: int) -> range:
        """Admit the next `take` choices; their indices."""
        self.admitted += take
        return range(self.admitted - take, self.admitted)

    def accept(self, choice: int, slot: int, start: int) -> Admission:
        """`choice` runs in `slot`, its prompt prefilled from `start`; the first choice's start is
        the request's cached tokens."""
        if choice == 0:
            self.cached_tokens = start
        return Admission(self, choice, slot, start)

    def end_empty(self, choices: range) -> None:
        """Nothing to generate (max_tokens 0): every choice ends at once, by length."""
        for choice in choices:
            self.put(Event(choice, finish_reason="length"))
        self.unfinished = 0
        self.put(None)

    def _sender(self) -> Callable[[TokenItem | Event | None], None]:
        """`put`, chosen once (it runs per token): into the engine's outbox (handed to the consumer once per scheduler
        iteration, in order with the plain steps' tokens: `hand_out`), else straight into a thread consumer's queue,
        or one loop call per item."""
        if self.outbox is not None:
            return self.outbox.sender(self.loop, self.enqueue)
        if self.loop is None:
            return self.enqueue
        loop, put = self.loop, self.enqueue
        return lambda item: None if loop.is_closed() else loop.call_soon_threadsafe(put, item)

    def __iter__(self) -> Iterator[Event]:
        while (event := self._queue.get()) is not None:
            if (event := self._read(event)) is not None:
                yield event

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self._queue.get()) is not None:
            if (event := self._read(event)) is not None:
                yield event

    def _read(self, item: TokenItem | Event) -> Event | None:
        """The engine's item as its choice's text event, or None where there is none (after a stop string, or a
        failure here, which fails the request as an engine error would)."""
        if self._failed:
            return None
        if isinstance(item, Event):  # an error, or a finish with no token (max_tokens 0)
            if item.error is not None:
                return item
            choice, tokens, finish = item.choice, (), item.finish_reason
        else:
            choice, token_id, logprob, top, finish = item
            tokens = (TokenLogprob(token_id, logprob, top),)
        try:
            if (stream := self._streams.get(choice)) is None:
                request = self.request
                stream = self._streams[choice] = ChoiceStream(self.tokenizer, request.stop, request.continues_prompt,
                                                              self.stop_ids, request.min_tokens)
            if (read := stream.read([t.token_id for t in tokens], finish)) is None:
                return None
            text, kept, finish = read
            if stream.hit:  # a stop string ended the choice: the engine frees its slot next
                self.stopped.add(choice)
                self._on_drop()
            return Event(choice, text, tokens[:kept], finish)
        except Exception as e:
            log.exception("processing a token failed")
            self._failed = True
            self.cancel()
            return Event(choice, error=f"processing a token failed: {e}")

    def _collect(self, completion: Completion, event: Event) -> None:
        if event.error:
            raise EngineError(event.error)
        choice = completion.choices[event.choice]
        choice.text += event.text
        choice.tokens.extend(event.tokens)
        choice.finish_reason = event.finish_reason or choice.finish_reason

    def result(self) -> Completion:
        """Block until the request is done and return everything it produced."""
        completion = Completion([Choice() for _ in range(self.request.n)], self.prompt_tokens)
        for event in self:
            self._collect(completion, event)
        completion.cached_tokens = self.cached_tokens
        completion.drafted_tokens, completion.accepted_tokens = self.drafted_tokens, self.accepted_tokens
        return completion

    async def aresult(self) -> Completion:
        completion = Completion([Choice() for _ in range(self.request.n)], self.prompt_tokens)
        async for event in self:
            self._collect(completion, event)
        completion.cached_tokens = self.cached_tokens
        completion.drafted_tokens, completion.accepted_tokens = self.drafted_tokens, self.accepted_tokens
        return completion


def stop_ids_of(request: Request, eos_ids: Iterable[int]) -> frozenset[int]:
    """The token ids that end a choice of `request`: its own, or else the tokenizer's EOS ids."""
    return frozenset(request.stop_token_ids if request.stop_token_ids is not None else eos_ids)


def sampling_row(options: SamplingOptions, choice: int, top_logprobs: int = 0, min_tokens: int = 0,
                 stop_ids: frozenset[int] = frozenset()) -> SamplingParams:
    """The device sampling row of one choice; an out-of-range knob is a RequestError naming it."""
    try:
        return make_params(**dataclasses.asdict(options), choice=choice, top_logprobs=top_logprobs,
                           min_tokens=min_tokens, stop_ids=sorted(stop_ids))
    except ValueError as e:
        raise RequestError(str(e), param=str(e).split()[0]) from None


def prepared(request: Request, *, vocab_size: int, max_seq_len: int, stop_ids: frozenset[int], speculative: bool
             ) -> tuple[Request, int, list[SamplingParams]]:
    """`request` checked (`validate`; speculation asked for only where the server offers it) with a seed drawn
    where it has none (its choices differ by index), its effective max_tokens and each choice's sampling row; a bad
    field is a RequestError naming it."""
    if request.speculative and not speculative:
        raise RequestError("speculative decoding is off on this server (start it with --speculative-ngram K)",
                           param="speculative")
    max_tokens = validate(request, vocab_size=vocab_size, max_seq_len=max_seq_len)
    if request.sampling.seed is None:
        request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, seed=random_seed()))
    return request, max_tokens, [sampling_row(request.sampling, i, request.top_logprobs, request.min_tokens, stop_ids)
                                 for i in range(request.n)]


def validate(request: Request, *, vocab_size: int, max_seq_len: int) -> int:
    """Check a request before it is queued; returns its effective max_tokens.

    Raises RequestError with the offending field in `param` (the engine's names: `prompt`, ...).
    """
    prompt = list(request.prompt)
    if not prompt:
        raise RequestError("the prompt is empty", param="prompt")
    if any(not 0 <= t < vocab_size for t in prompt):
        raise RequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    if len(prompt) >= max_seq_len:
        raise RequestError(
            f"This model's maximum context length is {max_seq_len} tokens. However, your prompt resulted in "
            f"{len(prompt)} tokens. Please reduce the length of the prompt.",
            param="prompt", code="context_length_exceeded")
    room = max_seq_len - len(prompt)
    max_tokens = room if request.max_tokens is None else request.max_tokens
    if max_tokens < 0:
        raise RequestError("max_tokens must be >= 0", param="max_tokens")
    if max_tokens > room:
        raise RequestError(
            f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
            f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} in the completion). "
            "Please reduce the length of the prompt or completion.",
            param="max_tokens", code="context_length_exceeded")
    if not 0 <= request.min_tokens <= max_tokens:
        raise RequestError(f"min_tokens must be in [0, max_tokens] ([0, {max_tokens}] here)", param="min_tokens")
    if not 1 <= request.n <= MAX_CHOICES:
        raise RequestError(f"n must be in [1, {MAX_CHOICES}]", param="n")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed", param="stop")
    stop_ids = set(request.stop_token_ids or ())
    if len(stop_ids) > MAX_STOP_IDS:
        raise RequestError(f"at most {MAX_STOP_IDS} stop token ids are allowed (EOS included)", param="stop_token_ids")
    if bad := sorted(t for t in stop_ids if not 0 <= t < vocab_size):
        raise RequestError(f"stop token ids must be in [0, {vocab_size}), got {bad[0]}", param="stop_token_ids")
    if bad := [token for token, _ in request.sampling.logit_bias if not 0 <= token < vocab_size]:
        raise RequestError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {bad[0]}",
                           param=f"logit_bias.{bad[0]}")
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
    return max_tokens
