"""The choices running in the decode slots, in the scheduler's thread. Each busy slot runs a `RunningChoice` (its
limits, constraint and drafting; `step` takes one token, `take` its tokens of a step); their token ids, counts and
stop ids are kept in arrays (`SlotTable`), so a plain step's tokens are taken for all its unconstrained slots at once
(a few numpy operations, not a Python call per token) and handed to each consumer event loop as one item (`hand_out`,
which runs in the consumer's thread and makes each choice's `TokenItem` there)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from llama_jax.packed import StepTokens, unpack
from llama_jax.request import Admission, Constraint, RequestHandle, TokenItem
from llama_jax.sampling import MAX_STOP_IDS, MIN_TEMPERATURE
from llama_jax.speculative import Acceptance, Drafting, SpeculativeConfig, after_verify

_NO_ID = -1  # stop-id padding: no token has it
_NEVER = np.iinfo(np.int64).max  # an idle row's max_tokens
# plain rows from which a plain step's tokens are taken all at once: its array operations cost about the same at 1 row
# as at 64, and one by one costs less below about 32 (docs/benchmarks.md)
AT_ONCE_FROM = 32

# a consumer of a plain step's tokens: (its handle's `enqueue`, choice, slot, top alternatives reported)
Receiver = tuple[Callable[[TokenItem], None], int, int, int]


@dataclasses.dataclass(eq=False)  # one per choice: compared by identity
class RunningChoice:
    """One choice running in a decode slot: its limits, constraint and drafting; its token ids (prompt and sampled)
    and count are its slot's row of the engine's `SlotTable`. `step` takes a sampled token."""

    handle: RequestHandle
    choice: int
    max_tokens: int
    stop_ids: frozenset[int]
    min_tokens: int
    table: SlotTable
    slot: int  # the decode slot it runs in now (the engine moves it down as others finish)
    constraint: Constraint | None = None
    top_logprobs: int = 0  # alternatives reported per token
    speculative: bool = False  # drafts are proposed for it (speculative.py)
    drafting: Drafting = Drafting()  # its recent acceptance and backoff
    draft: int = 0  # tokens drafted for the step in flight (0: none)
    context: int = 0  # that draft's matched context (speculative.propose)

    @property
    def generated(self) -> int:
        return int(self.table.counts[self.slot, 1])

    @property
    def ids(self) -> np.ndarray:
        """The token ids its slot holds: the prompt, then the sampled tokens (a view)."""
        return self.table.ids[self.slot, :self.table.counts[self.slot, 0]]

    def drafts_now(self) -> bool:
        return self.speculative and self.drafting.may_draft(self.generated)

    def drafted(self, n: int, context: int) -> None:
        """Its draft for the next step has `n` tokens after `context` matched ones (counted: the step is dispatched)."""
        self.draft, self.context = n, context
        self.handle.drafted_tokens += n

    def verified(self, accepted: int, config: SpeculativeConfig, cost: float, acceptance: Acceptance) -> int:
        """Its draft was verified in a step costing `cost` plain steps and `accepted` of its tokens held: update its
        record and the server's `acceptance`; `accepted`."""
        if self.draft:
            self.handle.accepted_tokens += accepted
            self.drafting = after_verify(self.drafting, self.draft, accepted, self.generated, config, cost)
            acceptance.observe(self.context, self.draft, accepted)
            self.draft = 0
        return accepted

    def step(self, token: int) -> str | None:
        """Take the sampled `token`; the choice's finish_reason once it is done (a complete grammar, a stop token or
        max_tokens), else None. Its text is made in the consumer's thread (`ChoiceStream`)."""
        generated = self.table.append(self.slot, token)
        if self.constraint:
            self.constraint.advance(token)
            if self.constraint.done():
                return "stop"
        if token in self.stop_ids and generated >= self.min_tokens:  # before min_tokens the sampler bans them
            return "stop"
        return "length" if generated >= self.max_tokens else None

    def take(self, out: StepTokens, row: int) -> bool:
        """Take its tokens of a step (row `row` of `out`; a verify step's, up to its end: the rest is cut as a plain
        step would) and hand each to its consumer; whether it ended."""
        for j in range(out.emitted[row]):
            token = out.tokens[row][j]
            finish = self.step(token)
            self.handle.put((self.choice, token, out.logprobs[row][j], out.top(row, j, self.top_logprobs), finish))
            if finish:
                return True
        return False


class SlotTable:
    """One row per decode slot, meaningful while `busy`; `plain` rows have no constraint (`take_all` takes their
    tokens; constrained ones are taken one by one, with their automaton's). Counts of the busy, constrained and not
    greedy-only rows (`heavy`: they sample or report alternatives) are kept as ints: asking costs no array operation."""

    def __init__(self, slots: int, max_seq_len: int):
        self.ids = np.zeros((slots, max_seq_len), np.int32)
        self.counts = np.zeros((slots, 2), np.int64)  # per row: tokens held (prompt and generated), tokens generated
        self.limits = np.zeros((slots, 2), np.int64)  # per row: min_tokens, max_tokens
        self.limits[:, 1] = _NEVER
        self.stop_ids = np.full((slots, MAX_STOP_IDS), _NO_ID, np.int32)
        self.busy = np.zeros(slots, bool)
        self.plain = np.zeros(slots, bool)
        self._heavy = np.zeros(slots, bool)
        self.busy_count = self.constrained_count = self.heavy_count = 0
        self._min_tokens = 0  # rows with min_tokens > 0
        self._index = np.arange(slots)
        self._arrays = (self.ids, self.counts, self.limits, self.stop_ids, self.busy, self.plain, self._heavy)
        self.choices: list[RunningChoice | None] = [None] * slots  # the engine's `slots`
        self._receivers: list[tuple | None] = [None] * slots  # a plain row's (loop, enqueue, choice, top_logprobs)
        self._by_loop: dict[asyncio.AbstractEventLoop | None, list[Receiver]] | None = None

    def start(self, choice: RunningChoice) -> None:
        """`choice` runs in its slot now (its prompt prefilled there)."""
        slot, handle, request = choice.slot, choice.handle, choice.handle.request
        self.choices[slot] = choice
        stops = sorted(choice.stop_ids)
        self.ids[slot, :len(request.prompt)] = request.prompt
        self.counts[slot] = len(request.prompt), 0
        self.limits[slot] = choice.min_tokens, choice.max_tokens
        self.stop_ids[slot, :len(stops)] = stops
        self.busy[slot], self.plain[slot] = True, choice.constraint is None
        self._heavy[slot] = request.sampling.temperature >= MIN_TEMPERATURE or choice.top_logprobs > 0
        self._receivers[slot] = (handle.loop, handle.enqueue, choice.choice, choice.top_logprobs) if self.plain[slot] else None
        self._count(slot, 1)

    def clear(self, slot: int) -> None:  # an idle row takes nothing and never ends (`take_all` computes it anyway)
        if self.busy[slot]:
            self._count(slot, -1)
        self.choices[slot] = None
        self.busy[slot] = self.plain[slot] = self._heavy[slot] = False
        self.counts[slot], self.limits[slot], self.stop_ids[slot] = 0, (0, _NEVER), _NO_ID
        self._receivers[slot], self._by_loop = None, None

    def _count(self, slot: int, sign: int) -> None:
        self.busy_count += sign
        self.constrained_count += sign * (not self.plain[slot])
        self.heavy_count += sign * bool(self._heavy[slot])
        self._min_tokens += sign * bool(self.limits[slot, 0])
        self._by_loop = None

    def swap(self, a: int, b: int) -> None:
        """Slots `a` and `b` trade their choices (as `device.swap_slots` their keys)."""
        for array in self._arrays:
            array[[a, b]] = array[[b, a]]
        self._receivers[a], self._receivers[b], self._by_loop = self._receivers[b], self._receivers[a], None
        self.choices[a], self.choices[b] = self.choices[b], self.choices[a]
        for slot in (a, b):
            if self.choices[slot] is not None:
                self.choices[slot].slot = slot

    @property
    def at_once(self) -> bool:
        """Whether a plain step's tokens are taken for all its plain rows at once (`take_all`): enough of them are busy."""
        return self.busy_count - self.constrained_count >= AT_ONCE_FROM

    def append(self, slot: int, token: int) -> int:
        """`slot` sampled `token`: it holds it now; how many tokens it generated."""
        held, generated = self.counts[slot].tolist()
        self.ids[slot, held] = token
        self.counts[slot] = held + 1, generated + 1
        return generated + 1

    def take_all(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append each plain slot's token of a plain step (`tokens` `[n]`: the first n slots'); which of the n slots
        end (bool `[n]`), and of those which on a stop id (else by max_tokens). A few numpy operations over all n
        rows: the others' next ids are written too (not theirs until they take a token themselves)."""
        n, rows = len(tokens), self.plain[:len(tokens)]
        counts = self.counts[:n]
        self.ids[self._index[:n], counts[:, 0]] = tokens  # a busy row holds fewer than max_seq_len until it ends
        counts += rows[:, None]
        generated, limits = counts[:, 1], self.limits[:n]
        stop = (self.stop_ids[:n] == tokens[:, None]).any(axis=1)
        if self._min_tokens:  # before min_tokens a stop id does not end a choice (the sampler bans them too)
            stop &= generated >= limits[:, 0]
        ended = generated >= limits[:, 1]
        ended |= stop
        if self.constrained_count:  # their tokens are not these
            ended &= rows
        return ended, stop

    def receivers(self) -> dict[asyncio.AbstractEventLoop | None, list[Receiver]]:
        """The plain slots' receivers of a plain step's tokens, by their consumers' event loops (kept until a slot changes)."""
        if self._by_loop is None:
            self._by_loop = {}
            for slot, r in enumerate(self._receivers):
                if r is not None:
                    self._by_loop.setdefault(r[0], []).append((r[1], r[2], slot, r[3]))
        return self._by_loop


def start_choice(admission: Admission, table: SlotTable, constraint: Constraint | None, speculative: bool
                 ) -> RunningChoice:
    """The running choice `admission` starts in its slot of `table` once its prompt is prefilled."""
    handle, request = admission.handle, admission.handle.request
    choice = RunningChoice(handle, admission.choice, handle.max_tokens, handle.stop_ids, request.min_tokens, table,
                           admission.slot, constraint, request.top_logprobs, speculative)
    table.start(choice)
    return choice


def hand_out(step: tuple[list[Receiver], np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Give each receiver its slot's token of a plain step (its `packed` result, packed.py) and whether it ended the
    choice (on a stop id, else by length), in the consumer's thread: the engine posts a step once per event loop."""
    receivers, packed, ended, stop = step
    out, ended, stop = unpack(packed), ended.tolist(), stop.tolist()
    for enqueue, choice, slot, k in receivers:
        finish = ("stop" if stop[slot] else "length") if ended[slot] else None
        enqueue((choice, out.tokens[slot][0], out.logprobs[slot][0], out.top(slot, 0, k), finish))  # a TokenItem


def wants_a_step(slots: Sequence[RunningChoice | None], unread: Iterable[Sequence[RunningChoice | None]]) -> bool:
    """Whether a busy slot may want a token beyond those of the `unread` results' owners (one each
    at most): not when each ends at max_tokens with its last token among them, where another step
    would be wasted."""
    if any(a and a.generated + 1 < a.max_tokens for a in slots):
        return True
    in_flight = {id(a) for owners in unread for a in owners if a}
    return any(a and id(a) not in in_flight for a in slots)
