"""The tool-call protocol on its own (llama_jax.tools): the system prompt and the incremental
parser of the envelope. Grammar-constrained envelopes are in test_structured.py."""

from __future__ import annotations

from llama_jax import tools as T
from helpers import CLOCK, WEATHER


def test_system_prompt_modes():
    auto = T.tools_system_prompt([WEATHER, CLOCK], "auto")
    assert '"name":"get_weather"' in auto and '"description":"Weather in a city"' in auto
    assert '{"name":"get_time","parameters":{}}' in auto and "plain text" in auto
    assert "at least one" in T.tools_system_prompt([WEATHER], "required")
    assert "Do not call" in T.tools_system_prompt([WEATHER], "none")
    assert "Call get_weather now" in T.tools_system_prompt([WEATHER, CLOCK], "required", "get_weather", False)


def test_parser_streams_names_then_argument_fragments():
    text = ' {"tool_calls": [{"name": "f", "arguments": {"a": "x}\\"{", "b": [1, {"c": null}]}}, ' \
           '{"name": "g", "arguments": {}}]}'
    whole = T.parse_tool_calls(text)
    assert whole.complete and [(c.name, c.arguments) for c in whole.calls] == [
        ("f", '{"a": "x}\\"{", "b": [1, {"c": null}]}'), ("g", "{}")]
    parser, events = T.ToolCallParser(), []
    for ch in text:
        events += parser.feed(ch)
    assert events[0] == ("call", 0, "f") and ("call", 1, "g") in events
    rebuilt: dict[int, str] = {}
    for kind, index, value in events:
        if kind == "arguments":
            assert index in {i for k, i, _ in events if k == "call"}
            rebuilt[index] = rebuilt.get(index, "") + value
    assert rebuilt == {0: whole.calls[0].arguments, 1: "{}"}
    text_parser = T.ToolCallParser()
    assert text_parser.feed("  ") == [] and text_parser.feed("Hi") == [("content", "  Hi")]
    assert text_parser.feed(" there") == [("content", " there")] and not text_parser.calls
    cut = T.parse_tool_calls('{"tool_calls": [{"name": "f", "arguments": {"a": "x')
    assert not cut.complete and cut.calls[0].arguments == '{"a": "x' and not cut.calls[0].complete
