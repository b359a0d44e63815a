"""Graceful shutdown of `llama-jax serve`: the first SIGTERM/SIGINT drains, a second one exits at once.

Draining: new chat requests get 503 `server_shutting_down` (and /health 503) at once; the requests
already accepted (running or queued) go on for up to the drain timeout; whatever is left then is
ended by stopping the engine, which the API turns into an error event and `data: [DONE]` for a
stream and a JSON 503 for a plain request. Only then does uvicorn close the (now idle) connections.
"""

from __future__ import annotations

import signal
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from llama_jax.request import RequestHandle

if TYPE_CHECKING:
    from api.app import ServerContext

POLL_S = 0.05


def live(handles: weakref.WeakSet[RequestHandle]) -> int:
    """How many of these accepted requests still have a choice generating (queued ones included)."""
    return sum(1 for h in list(handles) if h.unfinished > 0 and not h.cancelled.is_set())


def drain(ctx: ServerContext, timeout_s: float) -> tuple[int, int, float]:
    """Stop admitting, wait up to `timeout_s` for the accepted requests, then stop the engine (ending
    the rest). `ctx` is the app's ServerContext. Returns (requests at the start, requests ended
    unfinished, seconds waited)."""
    ctx.draining = True
    start = time.monotonic()
    running = live(ctx.handles)
    while live(ctx.handles) and time.monotonic() - start < timeout_s:
        time.sleep(POLL_S)
    cut = live(ctx.handles)
    ctx.engine.stop()  # fails whatever is left with an error event: the replies see ctx.draining
    return running, cut, time.monotonic() - start


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, but a signal drains the app (`drain`) before uvicorn's own shutdown, instead
    of cutting every open response after uvicorn's fixed grace period."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext, drain_timeout_s: float, say: Callable[[str], None],
                 on_signal: Callable[[], None] = lambda: None):
        super().__init__(config)
        self.ctx, self.drain_timeout_s, self.say, self.on_signal = ctx, drain_timeout_s, say, on_signal
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain in a thread (the event loop keeps serving); second: exit now."""
        if self._drainer is not None:
            self.should_exit = self.force_exit = True
            return
        self.on_signal()
        self._drainer = threading.Thread(target=self._drain, args=(signal.Signals(sig).name,),
                                         name="llama-jax-drain", daemon=True)
        self._drainer.start()

    def _drain(self, name: str) -> None:
        running, cut, waited = drain(self.ctx, self.drain_timeout_s)
        if cut:
            self.say(f"{name}: shutting down; {running - cut} of {running} requests finished, {cut} ended "
                     f"unfinished at the {self.drain_timeout_s:g} s drain timeout")
        else:
            self.say(f"{name}: shutting down; {running} requests finished in {waited:.1f} s")
        self.should_exit = True
