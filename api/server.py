"""The HTTP server under `llama-jax serve`: hypercorn, configured so that slow or idle clients
cannot hold it, plus a cap on the requests in progress.

Why hypercorn and not uvicorn: uvicorn starts its keep-alive timer only after a first response,
so a client that opens a connection and sends half a request header holds it forever (a probe
kept 300 such sockets open for as long as it cared to). hypercorn's keep-alive timer runs from
the moment a connection opens until its request headers are complete, and again after each
response: one setting bounds both header reads and idle keep-alive connections. It has no cap on
connections, so the app counts its requests in progress instead (`limit_concurrency`, as
uvicorn's `limit_concurrency` does): beyond the cap a request gets a 503 at once (/health, /ready
and /metrics are never refused), and connections without a request in progress are the idle and
half-sent ones the timer closes.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import msgspec
from hypercorn.config import Config
from litestar.types import ASGIApp, Receive, Scope, Send

from api.errors import APIError

UNCAPPED_PATHS = ("/health", "/ready", "/metrics")


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """What a client may hold: `keep_alive_timeout_s` bounds a connection with no request in
    progress (idle, or its headers not all arrived); `max_concurrency` caps requests in progress;
    `max_header_bytes` caps a request's head (status line and headers)."""

    keep_alive_timeout_s: float = 5.0
    max_concurrency: int = 1024
    max_header_bytes: int = 16 * 1024
    graceful_timeout_s: float = 5.0  # after the drain: how long the last bytes of responses may take

    def __post_init__(self) -> None:
        if not self.keep_alive_timeout_s > 0 or self.max_concurrency < 1 or self.max_header_bytes < 1024:
            raise ValueError("keep_alive_timeout_s must be > 0, max_concurrency >= 1 and max_header_bytes >= 1024")


def hypercorn_config(sock: socket.socket, limits: ConnectionLimits) -> Config:
    """hypercorn's settings for serving on the already bound, listening `sock` (through a duplicate
    of its descriptor, which hypercorn closes; the caller still closes `sock`)."""
    config = Config()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.keep_alive_timeout = limits.keep_alive_timeout_s
    config.h11_max_incomplete_size = limits.max_header_bytes
    config.graceful_timeout = limits.graceful_timeout_s
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"  # the serve command prints its own lines
    return config


def limit_concurrency(app: ASGIApp, limit: int, retry_after_s: int) -> ASGIApp:
    """`app` answering 503 `server_busy` (with Retry-After) to an HTTP request that arrives while
    `limit` others are in progress (the health and metrics routes excepted)."""
    in_progress = 0
    busy = APIError(503, f"The server has {limit} requests in progress, its limit; retry in a moment.",
                    code="server_busy")
    body = msgspec.json.encode(busy.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", str(max(retry_after_s, 1)).encode())]

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal in_progress
        if scope["type"] != "http" or scope["path"] in UNCAPPED_PATHS:
            await app(scope, receive, send)
            return
        if in_progress >= limit:
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        in_progress += 1
        try:
            await app(scope, receive, send)
        finally:
            in_progress -= 1

    return limited
