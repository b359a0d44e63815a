"""The engine thread's outgoing items for consumers, handed to each event loop once per scheduler
iteration (one `call_soon_threadsafe` carrying every row's items) instead of once per token: at 64
busy slots a wake-up of the loop per token costs more than the token's own work. A plain step's
tokens go in as one item for all its slots (`post`); thread consumers' items are put at the flush."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def _deliver(items: list[tuple[Callable[[object], None], object]]) -> None:
    for put, item in items:
        put(item)


class Outbox:
    """Collects (function, item) pairs per event loop (None: thread consumers), in order, until `flush`. Engine thread only."""

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop | None, list[tuple[Callable[[object], None], object]]] = {}

    def sender(self, loop: asyncio.AbstractEventLoop | None, put: Callable[[object], None]) -> Callable[[object], None]:
        """One consumer's put, called per item: `put(item)` will run in `loop`'s thread (the engine's for None) at the
        next `flush`, after everything sent or posted to that loop before it."""
        return lambda item: self._pending.setdefault(loop, []).append((put, item))

    def post(self, loop: asyncio.AbstractEventLoop | None, function: Callable[[object], None], item: object) -> None:
        """`function(item)` runs in `loop`'s thread (the engine's for None) at the next `flush`, in order."""
        self._pending.setdefault(loop, []).append((function, item))

    def flush(self) -> None:
        """Hand each loop its items in one call (a closed loop's are dropped: nobody reads them); thread consumers'
        items are put here."""
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            if loop is None:
                _deliver(items)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_deliver, items)
