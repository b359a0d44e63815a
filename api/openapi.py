"""The OpenAPI side of the routes: operations whose request body is a msgspec Struct's JSON schema,
references inlined (routes decode their body themselves, to name the bad field in every error, so
the document, and schemathesis in tests/test_fuzz.py, still knows each field and its range), and
the POST decorator that lists a route's reply and error bodies."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from litestar import post
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody

from api.protocol import ErrorBody

COMPLETION_ERRORS = {400: "invalid request (param names the field)", 401: "bad or missing key",
                     404: "model_not_found", 408: "the body arrived too slowly", 413: "body too large",
                     429: "queue full; see Retry-After", 503: "warming up, failed, or shutting down"}


def inline_schema(struct: type) -> dict[str, Any]:
    """The JSON schema of `struct` with every `$ref` replaced by its definition (no recursion in our requests)."""
    (root,), defs = msgspec.json.schema_components([struct])

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(root)


def body_operation(struct: type, description: str) -> type[Operation]:
    """An Operation class (for a route decorator's `operation_class`) whose JSON body is `struct`."""
    schema = inline_schema(struct)

    @dataclasses.dataclass
    class _Operation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(content={"application/json": OpenAPIMediaType(schema=schema)},  # type: ignore[arg-type]
                                            required=True, description=description)

    _Operation.__name__ = f"{struct.__name__}Operation"
    return _Operation


def post_route(paths: str | list[str], reply: type, summary: str, errors: Mapping[int, str],
               reply_description: str, **options: Any) -> Callable:
    """A POST decorator whose OpenAPI lists its `reply` body and its `errors` in the OpenAI error
    shape (the API key is checked app-wide by the app's guard)."""
    error_specs = {status: ResponseSpec(data_container=ErrorBody, description=text, generate_examples=False)
                   for status, text in errors.items()}
    return post(paths, status_code=200, summary=summary,
                responses={200: ResponseSpec(reply, description=reply_description, generate_examples=False),
                           **error_specs}, **options)


def completion_route(paths: list[str], reply: type, summary: str, description: str, **options: Any) -> Callable:
    """The POST decorator of a generating endpoint: its reply (or SSE stream) and its errors."""
    return post_route(paths, reply, summary, COMPLETION_ERRORS, f"{reply.__name__} (or an SSE stream of chunks)",
                      description=description, **options)
