"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure, never
Litestar's default body. `APIError` is raised by our code; the handlers below translate Litestar's
own exceptions (unknown route, wrong method, body too large, ...) into the same shape."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

log = logging.getLogger(__name__)

# OpenAI's error `type` per status; the `code` says precisely what went wrong.
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}
_CODES = {400: "invalid_value", 401: "invalid_api_key", 404: "unknown_url", 405: "method_not_allowed",
          413: "request_too_large", 429: "rate_limit_exceeded", 500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    """A failure to report to the client with an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or _CODES.get(status, "error")
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict:
        """The JSON body OpenAI sends for this error (also used as an SSE `data:` payload mid-stream)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(msgspec.json.encode(self.body()), status_code=self.status, media_type="application/json",
                        headers=self.headers)


def invalid(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    """A 400 naming the offending request field."""
    return APIError(400, message, param=param, code=code)


def handle_api_error(_: Request, exc: APIError) -> Response:
    return exc.response()


def handle_http_exception(request: Request, exc: HTTPException) -> Response:
    """Litestar's own HTTP errors (404 route, 405, 413, ...) in OpenAI's shape."""
    status = exc.status_code
    if status == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    elif status == 413:
        limit = request.route_handler.resolve_request_max_body_size()
        message = f"The request body is too large (the limit is {limit} bytes)"
    else:
        message = exc.detail
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
    return APIError(status, message, headers=headers).response()


def handle_unexpected(request: Request, exc: Exception) -> Response:
    """Any other exception: a 500 that does not leak internals (the traceback goes to the log)."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "The server had an error while processing your request.").response()


EXCEPTION_HANDLERS = {APIError: handle_api_error, HTTPException: handle_http_exception, Exception: handle_unexpected}
