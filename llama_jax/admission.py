"""Admission: which queued requests get free decode slots now, and how they group into prefills.

Pure decisions over the queue and the free slots; the engine carries them out (copies cached
prefixes, runs each group's prefill, hands each choice its slot). A request with more choices
than free slots is admitted in parts: it stays first in the queue until its last choice has one.
As choices finish, the busy ones left above their count's row bucket move down (`compaction`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from llama_jax.prefix_cache import Placement
from llama_jax.request import Admission, RequestHandle
from llama_jax.steps import bucket_for

Fits = Callable[[list[Sequence[int]]], bool]  # whether these prompt suffixes fit one compiled prefill


def take_batch(queue: collections.deque[RequestHandle], free: int, reusable: Callable[[Sequence[int]], int],
               fits: Fits) -> list[tuple[RequestHandle, range]]:
    """The queued requests (in order) to prefill together, each with the choices admitted now:
    they fit the `free` slots and, one row per choice (the part of the prompt `reusable` does not
    cover), one compiled prefill. The first request is always taken; its rows may need several
    prefills. Taken requests leave `queue` once their last choice is admitted."""
    batch: list[tuple[RequestHandle, range]] = []
    rows: list[Sequence[int]] = []
    while queue:
        head = queue[0]
        take = head.waiting_choices(free)
        if take == 0:
            break
        suffix = head.request.prompt[reusable(head.request.prompt):]
        if batch and not fits([*rows, *[suffix] * take]):
            break
        batch.append((head, head.admit(take)))
        if head.max_tokens:
            free -= take
            rows.extend([suffix] * take)
        if head.admitted < head.request.n:
            break
        queue.popleft()
    return batch


def place_batch(batch: list[tuple[RequestHandle, range]], free: list[int],
                place: Callable[[Sequence[int], list[int]], Placement],
                copy: Callable[[int, int], None]) -> list[Admission]:
    """A slot of `free` for each admitted choice (the one `place` picks: where the longest cached
    prefix of its prompt is, `copy`-ed there first if it sits in a busy slot); a request with
    max_tokens 0 ends at once."""
    admissions: list[Admission] = []
    for handle, choices in batch:
        if handle.max_tokens == 0:
            handle.end_empty(choices)
            continue
        for choice in choices:
            placement = place(handle.request.prompt, free)
            for source, slot in placement.copies:
                copy(source, slot)
            free.remove(placement.slot)
            admissions.append(handle.accept(choice, placement.slot, placement.start))
    return admissions


def prefill_groups(admissions: list[Admission], fits: Fits) -> Iterator[list[Admission]]:
    """Consecutive admissions in groups that each fit one compiled prefill."""
    group: list[Admission] = []
    for admission in admissions:
        if group and not fits([a.suffix for a in [*group, admission]]):
            yield group
            group = []
        group.append(admission)
    if group:
        yield group


def compaction(busy: np.ndarray, buckets: tuple[int, ...]) -> list[tuple[int, int]]:
    """The slot swaps (busy, free) that bring every busy slot under the row bucket of their count, the
    highest busy slot into the lowest free one first: a step's batch is the bucket of the highest busy
    slot, so a few choices left running high in the slots would otherwise run in the widest programs.
    `busy`: bool `[slots]` (asked every step: a few numpy operations)."""
    high = np.flatnonzero(busy)
    if not len(high) or high[-1] < (bucket := bucket_for(len(high), buckets)):
        return []
    return list(zip(reversed(high[high >= bucket].tolist()), np.flatnonzero(~busy[:bucket]).tolist()))
