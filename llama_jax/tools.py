"""The tool-call protocol, in one place: how the model is told about functions (`tools_system_prompt`),
how earlier calls are written into the conversation (`render_tool_calls`), the grammar of its
answer (`tools_lark`) and the parser that turns that answer back into OpenAI tool calls.

The model answers either plain text (tool_choice auto only) or one envelope
``{"tool_calls": [{"name": "f", "arguments": {...}}, ...]}`` whose arguments follow each
function's parameter schema; `render_tool_calls` writes the conversation's earlier calls in
exactly that form. `ToolCallParser` reads the envelope incrementally (name first, then argument
fragments) for streaming. structured.py compiles the grammar; the chat template renders history.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_jax.grammar import JsonState, json_steps, lark_json, lark_str, string_end

TOOL_CALLS_KEY = "tool_calls"


def function_calls(tool_calls: Any) -> list[tuple[Any, Mapping[str, Any]]]:
    """(id, function) of each OpenAI assistant tool call; ValueError unless every call has a
    function with a name."""
    if not isinstance(tool_calls, list):
        raise ValueError("tool_calls must be a list")
    calls = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError("each tool call needs a function with a name")
        calls.append((call.get("id"), function))
    return calls


def tool_calls_text(tool_calls: Any) -> str:
    """Assistant tool calls outside tools mode: one line of JSON, so the model sees what it called."""
    calls = [{"id": id_, "name": function["name"], "arguments": function.get("arguments", "")}
             for id_, function in function_calls(tool_calls)]
    return "[tool calls]: " + json.dumps(calls, ensure_ascii=False)


def render_tool_calls(tool_calls: Any) -> str:
    """Assistant tool calls exactly as the model is asked to emit them:
    ``{"tool_calls": [{"name": "f", "arguments": {...}}]}`` (json.dumps separators; arguments that
    are not valid JSON stay a string)."""
    calls = []
    for _, function in function_calls(tool_calls):
        arguments = function.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass
        calls.append({"name": function["name"], "arguments": arguments})
    return json.dumps({TOOL_CALLS_KEY: calls}, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """One OpenAI function tool."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None

    @property
    def schema(self) -> Mapping[str, Any]:
        """The arguments' schema; no parameters means an empty argument list (as OpenAI)."""
        if self.parameters is None:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return self.parameters


def tools_lark(tools: Sequence[ToolSpec], mode: str = "auto", parallel: bool = True) -> str:
    """Grammar of the tool-call envelope over `tools`. `mode` "auto": the envelope, or plain text
    that does not start with "{"; "required": the envelope. `parallel`: one or more calls, else
    exactly one (a forced function is "required" over that one tool, not parallel)."""
    if mode not in ("auto", "required") or not tools:
        raise ValueError(f"tools_lark needs tools and mode 'auto' or 'required', not {mode!r}")
    rules = []
    for i, tool in enumerate(tools):
        head = "{" + json.dumps("name") + ": " + json.dumps(tool.name) + ", " + json.dumps("arguments") + ": "
        rules.append(f"call_{i}: {lark_str(head)} args_{i} {lark_str('}')}")
        rules.append(f"args_{i}: {lark_json(tool.schema)}")
    calls = f"call ({lark_str(', ')} call)*" if parallel else "call"
    lines = [
        'start: " "? (envelope | TEXT)' if mode == "auto" else 'start: " "? envelope',
        *([r"TEXT: /[^{\s](.|\n)*/"] if mode == "auto" else []),
        f"envelope: {lark_str('{' + json.dumps(TOOL_CALLS_KEY) + ': [')} {calls} {lark_str(']}')}",
        "call: " + " | ".join(f"call_{i}" for i in range(len(tools))),
        *rules,
    ]
    return "\n".join(lines) + "\n"


def tools_system_prompt(tools: Sequence[ToolSpec], mode: str = "auto", function: str | None = None,
                        parallel: bool = True) -> str:
    """The system-block text that describes the tools and the envelope to the model (kept short:
    it is part of every prompt). `mode`: "auto", "required" or "none" (tools described, the model
    told not to call them now); `function`: the one function it must call."""
    lines = ["Functions (name, description, JSON schema of the arguments):"]
    for tool in tools:
        entry: dict[str, Any] = {"name": tool.name}
        if tool.description:
            entry["description"] = tool.description
        entry["parameters"] = tool.parameters if tool.parameters is not None else {}
        lines.append(json.dumps(entry, ensure_ascii=False, separators=(",", ":")))
    envelope = '{"' + TOOL_CALLS_KEY + '": [{"name": ..., "arguments": {...}}' + (", ..." if parallel else "") + "]}"
    lines.append(f"To call functions, reply with only {envelope}. Results come as \"[tool result for <name>]: ...\".")
    if function is not None:
        lines.append(f"Call {function} now.")
    elif mode == "required":
        lines.append("Call at least one function now.")
    elif mode == "none":
        lines.append("Do not call functions now; answer in plain text.")
    else:
        lines.append("Without a function, answer in plain text.")
    return "\n".join(lines)


@dataclasses.dataclass
class ParsedCall:
    index: int
    name: str
    arguments: str = ""
    complete: bool = False


class ToolCallParser:
    """Incremental parser of one choice's output under a tools grammar.

    `feed(text)` returns events: ("content", text) for a plain-text answer (auto), ("call", index,
    name) when a call's name is complete, then ("arguments", index, fragment) as its arguments'
    JSON text arrives. The envelope's layout is fixed by the grammar (separators ", " and ": ",
    "name" before "arguments"), so this follows it literally; anything else stops the parse
    (only a truncated or stop-string-cut output can do that).
    """

    _HEAD = "{" + json.dumps(TOOL_CALLS_KEY) + ": ["
    _NAME = '{"name": '
    _ARGS = ', "arguments": '

    def __init__(self) -> None:
        self.mode: str | None = None  # None until the first visible character, then "content" or "calls"
        self.calls: list[ParsedCall] = []
        self.text = ""  # everything fed
        self._buf = ""  # unparsed envelope text
        self._state = "head"
        self._json = JsonState()  # of the arguments value being read

    @property
    def complete(self) -> bool:
        """The envelope has been read to its end."""
        return self._state == "end"

    def feed(self, text: str) -> list[tuple]:
        self.text += text
        events: list[tuple] = []
        if self.mode is None:
            stripped = self.text.lstrip()
            if not stripped:
                return events
            self.mode = "calls" if stripped.startswith("{") else "content"
            if self.mode == "content":
                return [("content", self.text)]
            self._buf = stripped
        elif self.mode == "content":
            return [("content", text)] if text else events
        else:
            self._buf += text
        self._parse(events)
        return events

    def _expect(self, literal: str) -> bool | None:
        """Consume `literal` from the buffer: True, None if the buffer is still a prefix, False on a mismatch."""
        if self._buf.startswith(literal):
            self._buf = self._buf[len(literal):]
            return True
        if literal.startswith(self._buf):
            return None
        self._state = "error"
        return False

    def _parse(self, events: list[tuple]) -> None:
        while self._buf and self._state not in ("end", "error"):
            state = self._state
            if state == "head":
                if not self._expect(self._HEAD):
                    return
                self._state = "call"
            elif state == "call":
                if not self._expect(self._NAME):
                    return
                self._state = "name"
            elif state == "name":
                end = string_end(self._buf)
                if end is None:
                    if not self._buf.startswith('"'):
                        self._state = "error"
                    return
                name = json.loads(self._buf[:end])
                self._buf = self._buf[end:]
                self.calls.append(ParsedCall(len(self.calls), name))
                events.append(("call", len(self.calls) - 1, name))
                self._state = "args_key"
            elif state == "args_key":
                if not self._expect(self._ARGS):
                    return
                self._state, self._json = "args", JsonState()
            elif state == "args":
                taken = self._scan_value()
                fragment, self._buf = self._buf[:taken], self._buf[taken:]
                call = self.calls[-1]
                call.arguments += fragment
                if fragment:
                    events.append(("arguments", call.index, fragment))
                if self._json.depth == 0 and taken and not self._json.inside:
                    call.complete = True
                    self._state = "call_end"
                else:
                    return
            elif state == "call_end":
                if not self._expect("}"):
                    return
                self._state = "next"
            elif state == "next":
                if self._buf.startswith(", "):
                    self._buf = self._buf[2:]
                    self._state = "call"
                elif self._buf.startswith("]}"):
                    self._buf = self._buf[2:]
                    self._state = "end"
                elif self._buf in (",", "]"):
                    return
                else:
                    self._state = "error"

    def _scan_value(self) -> int:
        """How many characters of the buffer belong to the arguments value (an object or array)."""
        for i, state in enumerate(json_steps(self._buf, self._json)):
            before, self._json = self._json, state
            if not before.inside and state == before and state.depth == 0:
                self._state, self._json = "error", before  # arguments are always an object
                return i
            if not before.inside and before.depth == 1 and state.depth == 0:
                return i + 1
        return len(self._buf)


def parse_tool_calls(text: str) -> ToolCallParser:
    """Parse a whole output at once (the non-streamed reply): the same parser as streaming."""
    parser = ToolCallParser()
    parser.feed(text)
    return parser
