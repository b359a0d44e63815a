"""Which decode slot holds the keys of which tokens: the host side of prefix caching.

A finished request leaves its slot's KV in place: its prompt and its reply (all but the last
sampled token, whose keys were never computed). A new prompt that starts with tokens some slot
holds reuses them, and only its suffix is prefilled, at its true positions. Matching is on token
ids, as far as they agree (a reply re-tokenised from its text need not equal the generated ids).

A request always runs in the lowest free slot, because the busy slots' highest index sets the
decode batch. A prefix held elsewhere is copied into it first (one slot's keys: far cheaper than
a prefill), and what that slot held is first moved to the least recently used free slot, so the
idle slots keep the most recently used prefixes. A busy slot moved down as others finish trades
places with an idle one, records included (`swap`). The memory is the slots' own: nothing extra.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MIN_REUSE = 16  # shorter matches are not worth a copy


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one prompt goes: its slot, how many leading tokens it reuses, and the slot-to-slot
    copies (source, destination) to run first, in order."""

    slot: int
    start: int
    copies: tuple[tuple[int, int], ...] = ()


def common_prefixes(rows: np.ndarray, prompt: np.ndarray) -> np.ndarray:
    """How many leading tokens of `prompt` each row of `rows` (token ids, -1 past its end) shares: one numpy
    comparison for every slot, not a call per slot (7.6 us each on a slow CPU, 64 of them per admission)."""
    same = rows[:, : len(prompt)] == prompt[: rows.shape[1]]
    if not same.shape[1]:
        return np.zeros(len(rows), np.int64)
    return np.where(same.all(axis=1), same.shape[1], same.argmin(axis=1))


class PrefixCache:
    """Per-slot record of the token ids whose keys and values a slot holds, with LRU order.

    A slot's record only lists positions no later step overwrites: for a busy slot its prompt,
    for an idle one what its last request left. The cache's last position is never listed (an
    idle slot's ignored decode keeps rewriting it).
    """

    def __init__(self, slots: int, max_len: int, enabled: bool = True):
        self.enabled, self.max_len = enabled, max_len
        self._rows = np.full((slots, max_len - 1) if enabled else (slots, 0), -1, np.int32)  # held ids, -1 past the end
        self._lengths = [0] * slots
        self._used = [0] * slots
        self._clock = 0
        self.hits = 0  # placements that reused a prefix
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to them

    def place(self, prompt: list[int] | np.ndarray, free: list[int]) -> Placement:
        """Place `prompt` in the lowest of the `free` slots, reusing the longest prefix any slot
        holds (at least one token is always left to prefill)."""
        prompt = np.asarray(prompt, np.int32)
        slot, copies, start, source = min(free), [], 0, None
        if self.enabled:
            start, source = self._match(prompt, prefer=slot)
            spares = [s for s in free if s not in (slot, source)]
            if self._lengths[slot] >= MIN_REUSE and source != slot and spares:
                spare = min(spares, key=lambda s: (self._lengths[s] > 0, self._used[s]))
                if not self._lengths[spare] or self._used[spare] < self._used[slot]:
                    copies.append((slot, spare))  # keep what the slot held, evicting the oldest
                    self._keep(spare, self._rows[slot, : self._lengths[slot]])
                    self._used[spare] = self._used[slot]
            if source is not None and source != slot:
                copies.append((source, slot))
        if start:
            self.hits += 1
            self.reused_tokens += start
        self._clock += 1
        self._used[slot] = self._clock
        self._keep(slot, prompt[:start])  # until its prefill is done, only the reused prefix is sure
        return Placement(slot, start, tuple(copies))

    def reusable(self, prompt: list[int] | np.ndarray) -> int:
        """How many leading tokens of `prompt` a placement would reuse now (for batching decisions)."""
        return self._match(np.asarray(prompt, np.int32))[0] if self.enabled else 0

    def _match(self, prompt: np.ndarray, prefer: int | None = None) -> tuple[int, int | None]:
        """The longest prefix of `prompt` any slot holds, leaving one token to prefill, and that
        slot (ties go to `prefer`): (tokens, slot), or (0, None) below MIN_REUSE."""
        common = common_prefixes(self._rows, prompt[:-1])  # one token is always left to prefill
        start = int(common.max()) if len(common) else 0
        if start < MIN_REUSE:
            return 0, None
        if prefer is not None and common[prefer] == start:
            return start, prefer
        return start, int(np.flatnonzero(common == start)[-1])  # else the highest of the slots that tie

    def _keep(self, slot: int, tokens: np.ndarray) -> None:
        """`slot` holds the keys of `tokens` (not a view of its own row)."""
        self._rows[slot, len(tokens): self._lengths[slot]] = -1
        self._rows[slot, : len(tokens)] = tokens
        self._lengths[slot] = len(tokens)

    def hold(self, slot: int, tokens: list[int] | np.ndarray) -> None:
        """Record that `slot` holds the keys of `tokens` at positions 0..len-1."""
        self._clock += 1
        self._used[slot] = self._clock
        self._keep(slot, np.asarray(tokens, np.int32)[: self.max_len - 1] if self.enabled else np.zeros(0, np.int32))

    def swap(self, a: int, b: int) -> None:
        """Slots `a` and `b` traded their contents (`device.swap_slots`)."""
        self._rows[[a, b]] = self._rows[[b, a]]
        self._lengths[a], self._lengths[b] = self._lengths[b], self._lengths[a]
        self._used[a], self._used[b] = self._used[b], self._used[a]

    def forget(self, slot: int | None = None) -> None:
        """`slot`'s contents are unknown (a failed step), or every slot's with None (fresh state)."""
        for s in range(len(self._lengths)) if slot is None else [slot]:
            self._keep(s, np.zeros(0, np.int32))

    @property
    def cached_slots(self) -> int:
        return sum(n > 0 for n in self._lengths)

    @property
    def cached_tokens(self) -> int:
        return sum(self._lengths)
