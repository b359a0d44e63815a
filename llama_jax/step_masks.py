"""A decode batch's grammar masks on their way to a step's sampling (issue 30).

Each slot has one row of packed words (bitmask.py) in a host table: a constrained slot's is filled in place every
step, any other's allows every token. How the rows reach the sampling program is chosen per platform:
- "batch" (a CPU's default): the step passes its batch's host rows, `[rows, words]`, which the program's call copies,
  or all-ones rows resident on the device when no slot is constrained. A second program call costs a CPU's host
  more than the copy it saves (docs/benchmarks.md, "Grammar masks").
- "rows" (an accelerator's): the table lives on the device too, `[slots, words]`; a step uploads only the rows
  changed since the last (the constrained slots', and those freed or moved), padded to a row bucket and scattered
  in place by a small donated program. One constrained slot among 64 moves 4 KB a step, not 256 KB (1 MB at a
  128k vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from llama_jax import bitmask, steps

MODES = ("batch", "rows")


def mode(chosen: str | None, cpu: bool) -> str:
    """The upload mode an engine config asks for (`None`: "batch" on a CPU, "rows" elsewhere)."""
    if chosen is None:
        return "batch" if cpu else "rows"
    if chosen not in MODES:
        raise ValueError(f"mask_upload must be one of {MODES} or None, not {chosen!r}")
    return chosen


def put_rows(table: jax.Array, slots: jax.Array, rows: jax.Array) -> jax.Array:
    """`table` with rows `slots` replaced by `rows` (jit it with the table donated: in place); a slot named twice
    gets the same row each time (the padding repeats one)."""
    return table.at[slots].set(rows)


class StepMasks:
    """The slots' packed masks on the host and, in "rows" mode, on the device; what a step's sampling receives."""

    def __init__(self, slots: int, vocab: int, upload: str, buckets: tuple[int, ...], sharding=None):
        self.upload, self.buckets = upload, buckets
        self.host = bitmask.everything(slots, vocab)  # each slot's mask, filled in place
        if upload == "batch":  # all-ones rows per batch bucket, for the steps with no constrained slot
            self._everything = {r: jax.device_put(bitmask.everything(r, vocab), sharding) for r in buckets}
        else:
            self._sharding = sharding
            self.renew()

    def renew(self) -> None:
        """In "rows" mode, the device table put again from the host's (at start, and after a failed step: the old
        one may have been donated to it)."""
        if self.upload == "rows":
            self.table = jax.device_put(self.host, self._sharding)  # the device's copy, but for the rows in `_changed`
            self._changed: set[int] = set()

    def fill(self, slots: list) -> list[tuple[object, Exception]]:
        """Write each constrained slot's allowed tokens (`slots[i].constraint`) into its row; returns the slots whose
        constraint raised, with the error (their rows stay as they were)."""
        failed = []
        for i, active in enumerate(slots):
            if active and active.constraint:
                try:
                    active.constraint.fill_mask(self.host[i])
                except Exception as e:  # noqa: BLE001 - a broken automaton fails its own request only
                    failed.append((active, e))
                if self.upload == "rows":
                    self._changed.add(i)
        return failed

    def clear(self, slot: int) -> None:
        """`slot` allows every token again (it was freed)."""
        self.host[slot] = bitmask.EVERYTHING
        if self.upload == "rows":
            self._changed.add(slot)

    def swap(self, a: int, b: int) -> None:
        """Slots `a` and `b` trade masks (their choices moved: `Engine._compact`)."""
        self.host[[a, b]] = self.host[[b, a]]
        if self.upload == "rows":
            self._changed.update((a, b))

    def example(self, rows: int | None) -> jax.Array | None:
        """All-ones masks of a step's shape, for warm-up."""
        return self.table if self.upload == "rows" else self._everything.get(rows)

    def for_step(self, rows: int, constrained: bool, put: Callable) -> jax.Array | np.ndarray:
        """What a step over the first `rows` slots samples with: in "batch" mode its rows (a host copy where some slot
        is `constrained`: the table is filled again while a step may still read it, and a CPU aliases host arrays);
        in "rows" mode the device table, its changed rows uploaded first through `put` (`put_rows`, jitted)."""
        if self.upload == "batch":
            return self.host[:rows].copy() if constrained else self._everything[rows]
        if self._changed:
            changed = sorted(self._changed)
            n = steps.bucket_for(len(changed), self.buckets)
            which = np.array(changed + changed[-1:] * (n - len(changed)), np.int32)
            self.table, self._changed = put(self.table, which, self.host[which]), set()
        return self.table
