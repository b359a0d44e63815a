"""The request context every route shares, in the role of vLLM's engine client: the engine and the
server's state (settings, metrics, worker pool, drain), with what each route asks of them —
readiness, the model name, the body read and decoded, submission to the engine, and the errors a
drain or an engine failure turns into. Routes reach it with `context(request)`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import InternalServerException
from msgspec import Struct

from api import fields, validation
from api.errors import APIError
from api.metrics import Metrics, TokenTimer
from api.offload import Offload
from api.replies import TokenText
from api.settings import ServerSettings
from llama_jax.request import EngineError, Event, QueueFullError, RequestError, RequestHandle
from llama_jax.request import Request as EngineRequest

STATE_KEY = "llama_jax"  # the app state key under which the ServerContext lives
LOOP_PARSE_BYTES = 64 * 1024  # bodies up to this are parsed on the event loop (well under a millisecond)
T = TypeVar("T")
S = TypeVar("S", bound=Struct)


@dataclasses.dataclass
class ServerContext:
    """What the handlers share: the engine, settings, metrics and the token renderer."""

    engine: Any  # llama_jax.engine.Engine, or anything with its serving interface
    settings: ServerSettings
    metrics: Metrics
    token_text: TokenText
    created: int
    offload: Offload = dataclasses.field(default_factory=Offload)  # the worker pool of request CPU work
    draining: bool = False  # set by the serve command's shutdown (api.shutdown): new requests get 503
    handles: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)  # accepted requests, for the drain
    scoring_programs: dict = dataclasses.field(default_factory=dict)  # prompt scoring's, by shape (scoring.warm_up)

    def unavailable(self) -> APIError | None:
        """The 503 a generating request gets while the server cannot serve it (warming up, failed,
        shutting down); None when it can."""
        if self.draining:
            return self.shutting_down()
        if error := getattr(self.engine, "error", None):
            return APIError(503, f"The engine has failed and cannot serve requests: {error}", code="engine_failed")
        if not self.engine.ready:
            return APIError(503, "The model is still warming up; retry in a moment.", code="model_not_ready",
                            headers={"Retry-After": str(max(self.settings.retry_after_s, 1))})
        return None

    def require_ready(self) -> None:
        """503 while the server cannot serve: see `unavailable`."""
        if error := self.unavailable():
            raise error

    def require_model(self, model: str) -> None:
        """404 unless the request names the served model (or one of its aliases)."""
        if model not in self.settings.model_names:
            names = ", ".join(f"`{name}`" for name in self.settings.model_names)
            raise APIError(404, f"The model `{model}` does not exist. This server serves {names}.", param="model",
                           code="model_not_found")

    def shutting_down(self) -> APIError:
        """The 503 a request gets once the server drains (new ones at once, accepted ones when cut)."""
        return APIError(503, "The server is shutting down and accepts no new requests; retry on another instance "
                             "or in a moment.", code="server_shutting_down",
                        headers={"Retry-After": str(max(self.settings.retry_after_s, 1))})

    def engine_error(self, event: Event) -> APIError:
        """The error for an engine event that failed a request: the drain's cut (503) while the
        server shuts down, else the engine's own failure (500)."""
        if self.draining:
            return APIError(503, "The server is shutting down; this request was ended before it finished.",
                            code="server_shutting_down")
        return APIError(500, f"The engine failed this request: {event.error}", code="engine_error")

    async def read_body(self, request: Request) -> bytes:
        """The whole request body within the body timeout; 408 when it does not arrive in time, 499
        when the client leaves mid-upload."""
        timeout_s = self.settings.body_timeout_s
        try:
            return await asyncio.wait_for(request.body(), timeout_s)
        except TimeoutError:
            raise APIError(408, f"The request body did not arrive within {timeout_s:g} s.",
                           code="request_timeout") from None
        except InternalServerException:  # Litestar's way of saying the client disconnected mid-body
            raise APIError(499, "The client closed the request while sending it.",
                           code="client_closed_request") from None

    async def read_request(self, request: Request, type: type[S], policy: fields.FieldPolicy) -> S:
        """The body read and decoded as `type`, its fields beyond `type` checked by `policy` (fields.py).
        A large body is parsed in the offload pool: six 600 KB bodies take ~200 ms to parse, which on
        the loop would hold /health and every stream that long."""
        raw = await self.read_body(request)

        def parse() -> S:
            body = validation.decode_struct(raw, type)
            fields.check(raw, type, policy)
            return body

        if len(raw) <= LOOP_PARSE_BYTES:
            return parse()
        return await unless_disconnected(self.offload.run(parse), request.receive, lambda: None)

    def submit(self, engine_request: EngineRequest, rename: Mapping[str, str] | None = None) -> RequestHandle:
        """Queue a request on the engine (from the event loop); its refusals as 400 (the engine's
        field names mapped through `rename`) or 429 with Retry-After; 503 once the server drains."""
        if self.draining:  # the request was read while the drain began: not accepted
            raise self.shutting_down()
        try:
            handle = self.engine.submit(engine_request, loop=asyncio.get_running_loop())
        except RequestError as e:
            raise APIError(400, str(e), param=(rename or {}).get(e.param, e.param), code=e.code) from None
        except QueueFullError as e:
            raise APIError(429, f"The server is at capacity ({e}); retry after {self.settings.retry_after_s} s.",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except EngineError:  # stopped (shutting down) or failed since the readiness check
            raise self.unavailable() or APIError(503, "The engine is stopped.", code="engine_failed") from None
        self.handles.add(handle)  # the drain waits for it
        return handle


def context(connection: ASGIConnection) -> ServerContext:
    """The ServerContext of the app serving `connection`."""
    return connection.app.state[STATE_KEY]


async def accept_request(request: Request, type: type[S], policy: fields.FieldPolicy
                         ) -> tuple[ServerContext, S, TokenTimer]:
    """A generating route's first steps: its timer started, a 503 unless the server can serve, then
    its body read and decoded as `type` (see `read_request`). Returns (context, body, timer)."""
    ctx = context(request)
    timer = ctx.metrics.timer()
    ctx.require_ready()
    return ctx, await ctx.read_request(request, type, policy), timer


async def unless_disconnected(work: Awaitable[T], receive: Callable, cancel: Callable[[], None]) -> T:
    """The result of `work`, or (after `cancel()`) a 499 if the client disconnects first."""
    events = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({events, gone}, return_when=asyncio.FIRST_COMPLETED)
        # gone, even as the work ended: the server says so once, so a later wait would never hear it
        if gone.done() or not events.done():  # nobody will read the answer; 499 is for the logs and metrics
            raise APIError(499, "The client closed the request.", code="client_closed_request")
        return events.result()
    finally:
        gone.cancel()
        if not events.done():
            events.cancel()
            cancel()


async def _disconnected(receive: Callable) -> None:
    """Return once the ASGI server reports that the client went away (the body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
