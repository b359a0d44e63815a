"""The engine thread's outgoing events for asyncio consumers, handed to each event loop once per
scheduler iteration (one `call_soon_threadsafe` carrying every row's events) instead of once per
token: at 64 busy slots a wake-up of the loop per token costs more than the token's own work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def _deliver(items: list[tuple[Callable[[object], None], object]]) -> None:
    for put, item in items:
        put(item)


class Outbox:
    """Collects (put, item) pairs per event loop, in order, until `flush`. Engine thread only."""

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[object], None], object]]] = {}

    def sender(self, loop: asyncio.AbstractEventLoop, put: Callable[[object], None]) -> Callable[[object], None]:
        """One consumer's put, called per item (per token): `put(item)` will run in `loop`'s thread at the next `flush`,
        after everything sent to that loop before it."""
        return lambda item: self._pending.setdefault(loop, []).append((put, item))

    def flush(self) -> None:
        """Hand each loop its items in one call (a closed loop's are dropped: nobody reads them)."""
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_deliver, items)
