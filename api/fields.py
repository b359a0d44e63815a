"""Which top-level request fields a route takes, beyond the ones its request struct declares
(those are honoured, or refused by the route's own checks).

- OpenAI fields this server does not implement (`reasoning_effort`, `audio`, ...) are refused by
  name: 400 `unsupported_parameter`.
- Fields clients commonly send whose meaning is harmless here are accepted and ignored:
  `metadata`, `store: false`, `service_tier`, `safety_identifier`, `prompt_cache_key` (prefix
  caching is automatic), `modalities: ["text"]`. A value that asks for more (`store: true`,
  audio output) is refused by name.
- Anything else is OpenAI's 400: `Unrecognized request argument supplied: NAME`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from api.errors import invalid

_STRING = (str, type(None))


def _is_metadata(value: Any) -> bool:
    """OpenAI's metadata: at most 16 string keys (64 chars) to string values (512 chars)."""
    return value is None or (isinstance(value, dict) and len(value) <= 16 and all(
        isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()))


# name -> (is the value harmless?, what to say when it is not)
HARMLESS: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "metadata": (_is_metadata, "an object of at most 16 string keys (64 characters) to string values (512)"),
    "store": (lambda v: v in (False, None), "false: this server stores nothing (stateless)"),
    "service_tier": (lambda v: isinstance(v, _STRING), "a string (it is accepted and ignored)"),
    "safety_identifier": (lambda v: isinstance(v, _STRING), "a string (it is accepted and ignored)"),
    "prompt_cache_key": (lambda v: isinstance(v, _STRING), "a string (prefix caching is automatic here)"),
    "modalities": (lambda v: v in (None, ["text"]), '["text"]: this server has no audio output'),
}
CHAT_UNSUPPORTED = frozenset({"audio", "moderation", "prediction", "prompt_cache_options", "prompt_cache_retention",
                              "reasoning_effort", "verbosity", "web_search_options"})
RESPONSES_UNSUPPORTED = frozenset({"access_programs", "context_management", "conversation", "image", "max_tool_calls",
                                   "moderation", "prompt", "prompt_cache_options", "prompt_cache_retention",
                                   "reasoning", "stream_options"})


@dataclasses.dataclass(frozen=True)
class FieldPolicy:
    """A route's fields beyond its request struct."""

    unsupported: frozenset[str] = frozenset()  # OpenAI's, not implemented: refused by name
    harmless: frozenset[str] = frozenset()  # accepted and ignored (when their value is harmless)


CHAT = FieldPolicy(CHAT_UNSUPPORTED, frozenset(HARMLESS))
COMPLETIONS = FieldPolicy()
RESPONSES = FieldPolicy(RESPONSES_UNSUPPORTED, frozenset(HARMLESS) - {"modalities"})


def check(body: bytes, declared: type[msgspec.Struct], policy: FieldPolicy) -> None:
    """A 400 for the first unknown or unsupported top-level field of a JSON object body that
    decoded as `declared`, or a harmless field with a value that is not."""
    fields = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    own = {f.encode_name for f in msgspec.structs.fields(declared)}
    unknown = [name for name in fields if name not in own and name not in policy.unsupported
               and name not in policy.harmless]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise invalid(f"Unrecognized request argument{plural} supplied: {', '.join(unknown)}", unknown[0],
                      "unknown_parameter")
    for name in fields:
        if name in own:
            continue
        if name in policy.unsupported:
            raise invalid(f"'{name}' is not supported by this server.", name, "unsupported_parameter")
        if name in policy.harmless:
            ok, must = HARMLESS[name]
            if not ok(msgspec.json.decode(fields[name])):
                code = "unsupported_parameter" if name in ("store", "modalities") else "invalid_value"
                raise invalid(f"'{name}' must be {must}.", name, code)
