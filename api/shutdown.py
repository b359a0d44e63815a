"""Graceful shutdown of `llama-jax serve`: the first SIGTERM/SIGINT drains, a second one ends now.

Draining: new requests get 503 `server_shutting_down` (and /health 503) at once; the requests
already accepted (running or queued) go on for up to the drain timeout; whatever is left then is
ended by stopping the engine, which every route turns into an error event and `data: [DONE]` for
a stream and a JSON 503 for a plain request (`ServerContext.engine_error`, `replies.sse_body`).
Only then does the server close the (now idle) connections. A second signal does the same at once: the engine stops, the requests
still running get the same endings, one line says how many were cut, and the exit status is 1
if any were.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from hypercorn.asyncio import serve

from api.server import ConnectionLimits, hypercorn_config, limit_concurrency
from llama_jax.request import RequestHandle

if TYPE_CHECKING:
    from litestar import Litestar

    from api.context import ServerContext

POLL_S = 0.05


def live(handles: weakref.WeakSet[RequestHandle]) -> int:
    """How many of these accepted requests still have a choice generating (queued ones included)."""
    return sum(1 for h in list(handles) if h.unfinished > 0 and not h.cancelled.is_set())


def drain(ctx: ServerContext, timeout_s: float, forced: threading.Event | None = None) -> tuple[int, int, float]:
    """Stop admitting, wait up to `timeout_s` (or until `forced` is set) for the accepted requests,
    then stop the engine (ending the rest). `ctx` is the app's ServerContext. Returns (requests at
    the start, requests ended unfinished, seconds waited)."""
    ctx.draining = True
    start = time.monotonic()
    running = live(ctx.handles)
    while live(ctx.handles) and time.monotonic() - start < timeout_s and not (forced and forced.is_set()):
        time.sleep(POLL_S)
    cut = live(ctx.handles)
    ctx.engine.stop()  # fails whatever is left with an error event: the replies see ctx.draining
    return running, cut, time.monotonic() - start


class DrainingServer:
    """The app on hypercorn (api/server.py), on a socket already bound; a signal drains the app
    (`drain`) before the server closes its connections, a second one ends at once."""

    def __init__(self, app: Litestar, ctx: ServerContext, limits: ConnectionLimits, drain_timeout_s: float,
                 say: Callable[[str], None], on_signal: Callable[[], None] = lambda: None):
        self.app = limit_concurrency(app, limits.max_concurrency, ctx.settings.retry_after_s)
        self.ctx, self.limits, self.drain_timeout_s, self.say, self.on_signal = ctx, limits, drain_timeout_s, say, on_signal
        self.exit_code = 0  # 1 once a second signal cut requests
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._drainer: threading.Thread | None = None
        self._forced = threading.Event()
        self._stop_early = False

    def run(self, sock: socket.socket) -> int:
        """Serve until a signal has drained the app (or `stop()`); returns the exit status."""
        asyncio.run(self._serve(sock))
        return self.exit_code

    def stop(self) -> None:
        """End serving without a drain (from any thread): the warm-up failed."""
        self._stop_early = True
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _serve(self, sock: socket.socket) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        if self._stop_early:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._signal, sig)
        await serve(self.app, hypercorn_config(sock, self.limits), shutdown_trigger=self._stop.wait)

    def _signal(self, sig: int) -> None:
        """First signal: drain in a thread (the event loop keeps serving); second: end now."""
        name = signal.Signals(sig).name
        if self._drainer is None:
            self.on_signal()
            self._drainer = threading.Thread(target=self._drain, args=(name,), name="llama-jax-drain", daemon=True)
            self._drainer.start()
        elif not self._forced.is_set():
            self._forced.set()
            threading.Thread(target=self._end_now, args=(name,), name="llama-jax-stop", daemon=True).start()

    def _drain(self, name: str) -> None:
        running, cut, waited = drain(self.ctx, self.drain_timeout_s, self._forced)
        if self._forced.is_set():
            return  # the second signal's thread reports
        if cut:
            self.say(f"{name}: shutting down; {running - cut} of {running} requests finished, {cut} ended "
                     f"unfinished at the {self.drain_timeout_s:g} s drain timeout")
        else:
            self.say(f"{name}: shutting down; {running} requests finished in {waited:.1f} s")
        self._loop.call_soon_threadsafe(self._stop.set)

    def _end_now(self, name: str) -> None:
        self.ctx.draining = True
        cut = live(self.ctx.handles)
        self.ctx.engine.stop()  # every request still running or queued gets its error event now
        self.exit_code = 1 if cut else 0
        self.say(f"{name} again: stopping now; {cut} requests ended unfinished (each got a server_shutting_down "
                 f"error), exit status {self.exit_code}")
        self._loop.call_soon_threadsafe(self._stop.set)
