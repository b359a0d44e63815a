"""OpenAPI operations whose request body is a msgspec Struct's JSON schema, references inlined: for
routes that decode their body themselves (to name the bad field in every error), so that the
document (and schemathesis, tests/test_fuzz.py) still knows each field and its range."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody


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
