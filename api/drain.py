"""What every generating route does about the shutdown's drain (api/shutdown.py), in one place:
no new work while draining, and a request the drain ends gets a 503 `server_shutting_down` (plain)
or an error event and `data: [DONE]` (streamed). A route only has to raise `engine_error` for a
failed engine event and wrap its SSE body in `sse_body`; chat, completions and any later route
(e.g. /v1/responses) then drain alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from api.errors import APIError
from api.responses import encode, sse
from llama_jax.request import Event

if TYPE_CHECKING:
    from api.app import ServerContext

DONE = b"data: [DONE]\n\n"


def shutting_down(ctx: ServerContext) -> APIError:
    """The 503 a request gets once the server drains (new ones at once, accepted ones when cut)."""
    return APIError(503, "The server is shutting down and accepts no new requests; retry on another instance or in "
                         "a moment.", code="server_shutting_down",
                    headers={"Retry-After": str(max(ctx.settings.retry_after_s, 1))})


def engine_error(ctx: ServerContext, event: Event) -> APIError:
    """The error for an engine event that failed a request: the drain's cut (503) while the server
    shuts down, else the engine's own failure (500)."""
    if ctx.draining:
        return APIError(503, "The server is shutting down; this request was ended before it finished.",
                        code="server_shutting_down")
    return APIError(500, f"The engine failed this request: {event.error}", code="engine_error")


async def sse_body(ctx: ServerContext, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An SSE body whose generator may raise APIError after the headers went out: the error becomes
    one `data: {"error": ...}` event, followed by `data: [DONE]` when the drain ended the request
    (the stream is complete, only cut short) and nothing more when the engine failed it."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as e:
        yield sse(encode(e.body()))
        if e.code == "server_shutting_down":
            yield DONE
