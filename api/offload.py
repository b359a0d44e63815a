"""Request work beyond parsing runs off the event loop, in a small bounded pool of worker threads:
JSON-schema checks, grammar compilation, chat-template rendering and tokenization. A 600 KB schema
takes seconds of pure Python to check; on the loop that would freeze /health and every stream.

The pool is bounded (`workers` jobs at once; the rest wait their turn) and cancellable: a job
whose client leaves (or whose handler is cancelled) before it starts never runs, and one that
has started is abandoned (its thread finishes it and the result is dropped). Threads share the
GIL with the loop, so the bound also caps how much pure-Python work competes with the loop
(llguidance and the tokenizers release it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread


T = TypeVar("T")


@dataclasses.dataclass
class Offload:
    """The worker pool of one app: at most `workers` request jobs run at once."""

    workers: int = 2
    limiter: anyio.CapacityLimiter = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.limiter = anyio.CapacityLimiter(self.workers)

    async def run(self, job: Callable[..., T], *args: object) -> T:
        """`job(*args)` in the pool; APIErrors it raises reach the caller as they are."""
        return await anyio.to_thread.run_sync(job, *args, limiter=self.limiter, abandon_on_cancel=True)

    @property
    def busy(self) -> int:
        """Jobs running now (for metrics and tests)."""
        return int(self.limiter.borrowed_tokens)
