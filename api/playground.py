"""`GET /`: the chat playground, one static page from the package (no build step, no CDN), which
talks to the server through the public API alone (`/v1/models`, `/v1/chat/completions` streamed)."""

from __future__ import annotations

import hashlib
from importlib import resources

from litestar import Request, Response, get

PAGE = resources.files("api").joinpath("static/playground.html").read_bytes()
ETAG = '"' + hashlib.sha256(PAGE).hexdigest()[:16] + '"'


@get("/", summary="The chat playground (a static page)", include_in_schema=False, opt={"public": True})
async def playground(request: Request) -> Response[bytes]:
    """The page, cacheable: revalidated by its ETag, so a new version shows on the next load."""
    cache = {"ETag": ETAG, "Cache-Control": "public, max-age=0, must-revalidate"}
    if request.headers.get("if-none-match") == ETAG:
        return Response(b"", status_code=304, headers=cache)
    return Response(PAGE, media_type="text/html; charset=utf-8", headers=cache)
