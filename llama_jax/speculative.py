"""Prompt-lookup (n-gram) drafts for speculative decoding, proposed on the host.

A choice that copies spans of its input (summaries with quotes, edits, refactors, extraction)
keeps repeating n-grams it has seen. For each running slot, the longest recent n-gram ending its
tokens (n from `max_n` down to `min_n`) is looked up earlier in its prompt and output; the tokens
that followed its most recent earlier occurrence are the draft. The device then verifies the
draft in one step (`device.verify`): every drafted position is sampled exactly as a plain decode
step would sample it, and the longest prefix the samples agree with is kept, plus the model's
next token. With a deterministic draft that is speculative rejection sampling with a point-mass
proposal (accept d with probability p(d), else draw from p without d), so the output
distribution, and for a given seed the tokens themselves, are the target model's.

Whether a step verifies is a cost decision (`worth_verifying`): a verify step runs k + 1
positions in every busy slot, so it is taken only when the drafts' expected accepted tokens beat
its extra cost (a verify step's time in plain steps at that many rows: `measure_costs` at warm-up,
then the served steps' times, `StepTimes`, unless the config fixes it) by a margin. A draft is
expected to hold as often as the server's earlier drafts with as long a matched context
(`Acceptance`): one continuing a long verbatim match (copying) holds far more often than one after
a common 2-gram. A choice whose drafts keep failing backs off (`Drafting`): it drafts nothing for a
doubling number of tokens, then retries. All of it changes only which program runs, never a token.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

CPU_VERIFY_COST, ACCELERATOR_VERIFY_COST = 2.0, 1.5  # a verify step's time in plain steps, until measured
# a choice's expected share of accepted draft tokens before it has any: optimistic, since a draft's worth is known only by
# verifying it (where a verify step costs over 1 + k/2 plain steps, a prior of 0.5 never tried one: docs/benchmarks.md);
# the backoff bounds what failing drafts cost
PRIOR_ACCEPTANCE = 1.0

MAX_CONTEXT = 64  # a draft's matched context is counted up to this many tokens (its bucket: log2, `context_bucket`)

__all__ = ["Acceptance", "Drafting", "SpeculativeConfig", "StepTimes", "after_verify", "choose_drafts", "context_bucket",
           "measure_costs", "propose", "worth_verifying"]


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Prompt-lookup speculation: `tokens` drafted per step (static: the verify program's width;
    0 compiles nothing and turns speculation off), the n-gram sizes tried (`max_n` down to
    `min_n`; `propose` itself defaults to 1..4), and whether requests speculate unless they say
    otherwise (`default`)."""

    tokens: int = 0
    min_n: int = 2  # a 1-token match drafts poorly (measured: docs/benchmarks.md), and a verify step costs
    max_n: int = 4
    default: bool = True
    # a verify step's time in plain decode steps: it pays when the drafts' expected accepted tokens
    # exceed (verify_cost - 1) x the busy slots. None: measured per batch size at warm-up (`measure_costs`),
    # then followed as steps are served (`StepTimes`)
    verify_cost: float | None = None
    smoothing: float = 0.5  # weight of the latest draft in a choice's acceptance average
    backoff: int = 1  # tokens a choice drafts nothing after its first failed draft; doubles per failure
    max_backoff: int = 128
    # a verify step is taken when its expected accepted tokens exceed its extra cost times this: the steps chosen are
    # those whose expectations are high, so at break-even they lose (measured: docs/benchmarks.md)
    margin: float = 1.3

    def __post_init__(self):
        if not 0 <= self.tokens <= 32:
            raise ValueError(f"speculative tokens must be in [0, 32], got {self.tokens}")
        if self.verify_cost is not None and self.verify_cost < 1:
            raise ValueError(f"verify_cost must be >= 1 (a verify step does a plain step's work), got {self.verify_cost}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if not 0 <= self.backoff <= self.max_backoff:
            raise ValueError(f"speculative backoff needs 0 <= backoff <= max_backoff, got {self.backoff}, {self.max_backoff}")
        if self.margin < 1:
            raise ValueError(f"speculative margin must be >= 1, got {self.margin}")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"speculative n-gram sizes need 1 <= min_n <= max_n, got {self.min_n}..{self.max_n}")

    def for_platform(self, cpu: bool) -> SpeculativeConfig:
        """This config with `verify_cost` set where it was left to the platform, the guess used until
        warm-up measures it: about 1.5 where a step reads the weights once either way (a GPU at small
        batch), 2 on a CPU, where the extra positions cost compute (docs/benchmarks.md)."""
        if self.verify_cost is not None:
            return self
        return dataclasses.replace(self, verify_cost=CPU_VERIFY_COST if cpu else ACCELERATOR_VERIFY_COST)

    @property
    def enabled(self) -> bool:
        return self.tokens > 0

    def applies(self, requested: bool | None, constrained: bool) -> bool:
        """Whether a request speculates: its own choice (`requested`), else the server's default;
        never with a grammar constraint (its mask is per position) or with speculation off."""
        return self.enabled and not constrained and (self.default if requested is None else requested)


def propose(ids: Sequence[int] | np.ndarray, k: int, min_n: int = 1, max_n: int = 4) -> tuple[list[int], int]:
    """Up to `k` draft tokens to follow `ids`: what followed the most recent earlier occurrence of
    the longest n-gram (n in `max_n`..`min_n`) that ends `ids`, and the context matched there: how
    many tokens before it equal those ending `ids` (at least n, at most `MAX_CONTEXT`). ([], 0) when
    none recurs."""
    ids = np.asarray(ids, np.int32)
    size = len(ids)
    if k <= 0:
        return [], 0
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        pattern = ids[size - n:]
        # windows starting at 0..size-n-1: each earlier occurrence has at least one token after it
        windows = np.lib.stride_tricks.sliding_window_view(ids[:size - 1], n)
        hits = np.flatnonzero(np.all(windows == pattern, axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            before, ending = ids[max(0, start - MAX_CONTEXT):start][::-1], ids[max(0, size - MAX_CONTEXT):][::-1]
            differ = np.flatnonzero(before[:len(ending)] != ending[:len(before)])
            return ids[start:start + k].tolist(), int(differ[0]) if len(differ) else min(len(before), len(ending))
    return [], 0


def context_bucket(context: int) -> int:
    """A matched context's bucket: its length's bit length (2-3 tokens, 4-7, 8-15, 16-31, 32 and more)."""
    return min(context, MAX_CONTEXT // 2).bit_length()


class Acceptance:
    """The share of the server's drafted tokens that were accepted, per bucket of their drafts' matched context
    (`context_bucket`): what the next draft with such a context is expected to hold. Measured on the real model, drafts
    after 2-7 matched tokens held 0.2-0.5 of their tokens, after 16 or more about 0.9 (docs/benchmarks.md). Each bucket
    starts with `prior` tokens fully accepted, so it is tried before it is judged, and forgets by half every
    `half_life` tokens drafted in it, and every `unverified_half_life` tokens proposed in it but not verified (the
    step did not pay): a bucket judged poor is tried again after a while, not never (what a server drafts changes)."""

    def __init__(self, prior: float = 8.0, half_life: float = 256.0, unverified_half_life: float = 2048.0):
        self.prior, self.half_life, self.unverified_half_life = prior, half_life, unverified_half_life
        self._accepted = np.zeros(context_bucket(MAX_CONTEXT) + 1)
        self._drafted = np.zeros_like(self._accepted)

    def share(self, context: int) -> float:
        b = context_bucket(context)
        return float((self._accepted[b] + self.prior) / (self._drafted[b] + self.prior))

    def observe(self, context: int, drafted: int, accepted: int) -> None:
        b, keep = context_bucket(context), 0.5 ** (drafted / self.half_life)
        self._accepted[b] = self._accepted[b] * keep + accepted
        self._drafted[b] = self._drafted[b] * keep + drafted

    def unverified(self, context: int, proposed: int) -> None:
        """`proposed` tokens drafted after `context` matched tokens went unverified: the bucket forgets a little."""
        b, keep = context_bucket(context), 0.5 ** (proposed / self.unverified_half_life)
        self._accepted[b] *= keep
        self._drafted[b] *= keep


def draft_rows(rows: Sequence[tuple[Sequence[int], int] | None], config: SpeculativeConfig
               ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The verify step's inputs for each slot: `rows[i]` is (its tokens, the most it may draft)
    or None (idle or not speculating). Returns drafts `[slots, k]` (padded with 0), their
    counts `[slots]`, and each draft's matched context (`propose`)."""
    drafts = np.zeros((len(rows), config.tokens), np.int32)
    counts = np.zeros(len(rows), np.int32)
    contexts = [0] * len(rows)
    for i, row in enumerate(rows):
        if row is not None:
            draft, contexts[i] = propose(row[0], min(config.tokens, row[1]), config.min_n, config.max_n)
            drafts[i, :len(draft)], counts[i] = draft, len(draft)
    return drafts, counts, contexts


@dataclasses.dataclass(frozen=True)
class Drafting:
    """One choice's drafting record: the moving average of the share of its drafted tokens that
    were accepted (`PRIOR_ACCEPTANCE` before any), its failed drafts in a row, and how many tokens
    it must have generated before it drafts again (its backoff)."""

    acceptance: float = PRIOR_ACCEPTANCE
    failures: int = 0
    resume_at: int = 0

    def may_draft(self, generated: int) -> bool:
        return generated >= self.resume_at


def after_verify(record: Drafting, drafted: int, accepted: int, generated: int, config: SpeculativeConfig,
                 cost: float) -> Drafting:
    """`record` after a verified draft of `drafted` tokens of which `accepted` held, the choice
    having generated `generated` tokens, in a step costing `cost` plain steps. The draft failed when
    none held or when the average fell below what pays for the choice's own row (acceptance x k <
    cost - 1); then the choice backs off (`backoff` tokens, doubled per failure in a row, at most
    `max_backoff`) and its retry starts from the prior again."""
    acceptance = (1 - config.smoothing) * record.acceptance + config.smoothing * accepted / drafted
    if accepted > 0 and acceptance * config.tokens >= cost - 1:
        return Drafting(acceptance, 0, 0)
    failures = record.failures + 1
    wait = min(config.backoff << min(failures - 1, 30), config.max_backoff)
    return Drafting(PRIOR_ACCEPTANCE, failures, generated + wait)


def worth_verifying(expected: float, busy: int, cost: float, margin: float = 1.0) -> bool:
    """Whether a verify step costing `cost` plain steps beats a plain one by `margin`: the `expected`
    accepted draft tokens over all slots against the `busy` slots' extra work (busy + expected tokens
    in `cost` plain steps' time, against busy per step)."""
    return expected > 0 and expected >= margin * (cost - 1) * busy


def choose_drafts(slots: Sequence, config: SpeculativeConfig, max_seq_len: int, busy: int, cost: float,
                  acceptance: Acceptance) -> tuple[np.ndarray, np.ndarray] | None:
    """The verify step's drafts and counts for `slots` (running choices or None): each choice not
    backing off drafts at most what its max_tokens and the context leave after the token every step
    makes, and is told its draft (`drafted`). None when a plain step is worth more at `cost`
    (`worth_verifying`, each draft expected to hold as `acceptance` says of its context; the drafts' buckets then
    forget a little: `Acceptance.unverified`)."""
    drafting = [a if a and a.drafts_now() else None for a in slots]
    drafts, counts, contexts = draft_rows([(a.ids, min(a.max_tokens - a.generated - 1, max_seq_len - len(a.ids)))
                                           if a else None for a in drafting], config)
    expected = sum(acceptance.share(c) * int(n) for a, n, c in zip(drafting, counts, contexts) if a)
    if not worth_verifying(expected, busy, cost, config.margin):
        for a, n, c in zip(drafting, counts, contexts):
            if a and n:
                acceptance.unverified(c, int(n))
        return None
    for a, n, c in zip(slots, counts, contexts):
        if a:
            a.drafted(int(n), c)
    return drafts, counts


MEASURED_REPEATS = 5  # timed (plain, verify) pairs per row bucket (the median ratio counts)


def measured_length(max_seq_len: int, buckets: int, k: int, repeats: int = MEASURED_REPEATS) -> int:
    """The slots' length to measure costs from: half the context, less where `measure_costs`' steps
    (a plain and a verify of no drafts per bucket, each run 1 + `repeats` times, one token each) would overflow it."""
    return max(0, min(max_seq_len // 2, max_seq_len - 2 * (1 + repeats) * buckets - k - 1))


def measure_costs(step: Callable[[int, tuple[np.ndarray, np.ndarray] | None], object], drafts: tuple[np.ndarray, np.ndarray],
                  buckets: Sequence[int], repeats: int = MEASURED_REPEATS, clock: Callable[[], float] = time.perf_counter
                  ) -> dict[int, float]:
    """A verify step's time in plain steps for each row bucket: `step(rows, None)` runs a plain step to
    completion, `step(rows, drafts)` a verify step. Each runs once first (a CPU's first run of a
    program plans its kernels), then `repeats` plain and verify pairs back to back; the median of the
    pairs' ratios counts. A pair sees the machine in one state (a shared box's speed drifts by 2x
    over minutes, which a best plain time taken apart from the best verify time mixes up), and the median
    ignores the pairs a short disturbance split."""
    def timed(rows: int, verify: bool) -> float:
        start = clock()
        step(rows, drafts if verify else None)
        return clock() - start

    costs = {}
    for rows in buckets:
        step(rows, None)
        step(rows, drafts)
        ratios = []
        for _ in range(repeats):
            plain = timed(rows, False)
            ratios.append(timed(rows, True) / max(plain, 1e-9))
        costs[rows] = max(1.0, float(np.median(ratios)))
    return costs


class StepTimes:
    """The latest served steps' times per (row bucket, plain or verify), and from them the verify cost
    the decision uses: warm-up measures the machine for seconds, while a shared box's speed and the
    context lengths move as it serves. Medians of the last `window`, so one disturbed step (another
    process, a program's first run) moves nothing."""

    def __init__(self, window: int = 9, min_steps: int = 3):
        self.min_steps = min_steps
        self._times: dict[tuple[int, bool], collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=window))
        self._last: float | None = None

    def observe(self, rows: int, verify: bool, seconds: float) -> float | None:
        """Record one step's time; the verify cost at `rows` (at least 1) once both kinds have `min_steps`
        times there, else None."""
        self._times[rows, verify].append(seconds)
        plain, checked = self._times[rows, False], self._times[rows, True]
        if min(len(plain), len(checked)) < self.min_steps:
            return None
        return max(1.0, statistics.median(checked) / max(statistics.median(plain), 1e-9))

    def lap(self, step: tuple[int, bool] | None, reading: bool, clock: Callable[[], float] = time.perf_counter
            ) -> dict[int, float]:
        """Once per scheduler iteration, after its reads. While each step is read before the next is dispatched
        (`reading`: speculating), the time since the last lap is the step just read, host work included: `step`,
        its (rows, verified), or None when other work ran between (an admission). {rows: its new cost} or {}."""
        now = clock() if reading else None
        last, self._last = self._last, now
        cost = self.observe(*step, now - last) if step and last is not None and now is not None else None
        return {} if cost is None else {step[0]: cost}
