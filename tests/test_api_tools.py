"""Structured output and tool calls end to end (issue 7): uvicorn serving a real Engine on the tiny
random-weight model, called with the real `openai` client. Random weights are the hardest case for
a constraint (they never close a string on their own), so every JSON reply below is complete and
valid only because the grammar and the token budget make it so.

Every test runs twice: on the real Llama 2 tokenizer and on the demo model `llama-jax serve` serves
without a checkpoint (its own small tokenizer), which must behave the same (issue 13)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from api.app import create_app
from api.settings import ServerSettings
from llama_jax import tools
from live_server import LiveServer
from llama_jax.engine import Engine, EngineConfig
from llama_jax.hf_checkpoint import load_hf_model
from llama_jax.tokenizer import Tokenizer, apply_chat_template

MODEL = "meta-llama/Llama-2-7b-chat-hf"
HELLO = [{"role": "user", "content": "Hello!"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "address", "role"],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": {"type": "object", "maxProperties": 0}}


@pytest.fixture(scope="module", params=["llama2-tokenizer", "demo-model"])
def engine(request, tiny_checkpoint):
    if request.param == "demo-model":
        yield request.getfixturevalue("demo_engine")  # shared for the session: stopped there
        return
    tokenizer = Tokenizer(request.getfixturevalue("tokenizer_path"))
    config = EngineConfig(max_slots=8, max_seq_len=256, min_prefill_bucket=32)
    engine = Engine(load_hf_model(tiny_checkpoint("tiny-gqa")), tokenizer, config).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def server(engine):
    server = LiveServer(create_app(engine, ServerSettings()))
    yield server
    server.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def create_all(server, requests: list[dict]) -> list:
    """Send every request at once (the async client), in order."""
    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(c.chat.completions.create(model=MODEL, **r) for r in requests))

    return asyncio.run(run())


def check_calls(choice, schemas=SCHEMAS) -> list[tuple[str, str]]:
    """A tool-call choice in OpenAI's shape; returns its (name, arguments) pairs."""
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    calls = choice.message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    return [(c.function.name, c.function.arguments) for c in calls]


def reassemble(chunks) -> tuple[dict[int, list[tuple[str, str]]], dict[int, str | None], dict[int, str]]:
    """Streamed tool-call deltas per choice -> ([(name, arguments)], finish_reason, content), checking
    OpenAI's delta order: index + id + type + name (arguments "") first, then argument fragments."""
    calls: dict[int, dict[int, list]] = {}
    finish: dict[int, str | None] = {}
    content: dict[int, str] = {}
    for chunk in chunks:
        for ch in chunk.choices:
            content[ch.index] = content.get(ch.index, "") + (ch.delta.content or "")
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
            for delta in ch.delta.tool_calls or ():
                mine = calls.setdefault(ch.index, {})
                if delta.index not in mine:
                    assert delta.index == len(mine) and delta.id.startswith("call_") and delta.type == "function"
                    assert delta.function.name and delta.function.arguments == ""
                    mine[delta.index] = [delta.function.name, ""]
                else:
                    assert delta.id is None and delta.function.name is None
                    mine[delta.index][1] += delta.function.arguments
    return ({i: [tuple(c[k]) for k in sorted(c)] for i, c in calls.items()}, finish, content)


# ------------------------------------------------------------------------------------ JSON mode


def test_json_object_is_valid_for_50_seeds(server, engine):
    budgets = [1 + (seed * 37) % 150 for seed in range(50)]
    outs = create_all(server, [dict(messages=HELLO, response_format={"type": "json_object"}, seed=seed,
                                    max_tokens=budget) for seed, budget in zip(range(50), budgets)])
    for out, budget in zip(outs, budgets):
        (choice,) = out.choices
        assert choice.finish_reason == "stop" and out.usage.completion_tokens <= budget
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        assert choice.message.tool_calls is None
    # the model still chooses (the demo's random weights mostly pick its one-token "{}" piece)
    assert len({o.choices[0].message.content for o in outs}) > (40 if engine.tokenizer.vocab_size == 32000 else 1)


def test_json_schema_validates_for_50_seeds(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    budgets = [60 + (seed * 13) % 90 for seed in range(50)]
    outs = create_all(server, [dict(messages=HELLO, response_format=fmt, seed=seed, max_tokens=budget,
                                    temperature=0.5 + (seed % 4) / 2) for seed, budget in zip(range(50), budgets)])
    for out, budget in zip(outs, budgets):
        (choice,) = out.choices
        assert choice.finish_reason == "stop" and out.usage.completion_tokens <= budget
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_streams_as_content_and_n_choices_are_independent(client):
    """A required string of at least 6 characters: random weights choose them, so two independent choices
    differ (a bare json_object may be `{}` in both, and an unbounded string `""` in both, as the demo's
    tokenizer, trained on the package's source, changes with it)."""
    note = {"type": "object", "properties": {"note": {"type": "string", "minLength": 6}}, "required": ["note"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "note", "schema": note}}
    args = dict(model=MODEL, messages=HELLO, response_format=fmt, max_tokens=40, seed=7, n=2)
    plain = client.chat.completions.create(**args)
    for choice in plain.choices:
        jsonschema.validate(json.loads(choice.message.content), note)
    assert plain.choices[0].message.content != plain.choices[1].message.content
    _, finish, content = reassemble(client.chat.completions.create(stream=True, **args))
    assert content == {c.index: c.message.content for c in plain.choices}
    assert finish == {0: "stop", 1: "stop"}


def test_budget_below_the_schema_minimum_is_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    out = client.chat.completions.create(model=MODEL, messages=HELLO, response_format=fmt, max_tokens=4, seed=1)
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content.startswith("{")
    text = client.chat.completions.create(model=MODEL, messages=HELLO, response_format={"type": "text"},
                                          max_tokens=4, seed=1)
    assert text.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------ tools


@pytest.mark.parametrize("tool_choice,parallel", [
    ("required", None), ("required", False), ({"type": "function", "function": {"name": "get_weather"}}, None)],
    ids=["required", "required-single", "named"])
def test_forced_tool_calls_parse_and_validate(server, tool_choice, parallel):
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    outs = create_all(server, [dict(messages=HELLO, tools=TOOLS, tool_choice=tool_choice, seed=seed,
                                    max_tokens=40 + seed * 4, **extra) for seed in range(10)])
    names = set()
    for out in outs:
        calls = check_calls(out.choices[0])
        names |= {name for name, _ in calls}
        if parallel is False or isinstance(tool_choice, dict):
            assert len(calls) == 1
    if isinstance(tool_choice, dict):
        assert names == {"get_weather"}


@pytest.mark.parametrize("seed", range(4))
def test_streamed_tool_calls_reassemble_to_the_plain_result(client, seed):
    args = dict(model=MODEL, messages=HELLO, tools=TOOLS, tool_choice="required", max_tokens=60, seed=seed,
                n=2 if seed == 3 else 1)
    plain = client.chat.completions.create(**args)
    streamed, finish, content = reassemble(client.chat.completions.create(stream=True, **args))
    for choice in plain.choices:
        assert streamed[choice.index] == check_calls(choice)
        assert finish[choice.index] == "tool_calls" and content[choice.index] == ""


def test_auto_is_text_or_calls_and_none_is_text(server, client):
    outs = create_all(server, [dict(messages=HELLO, tools=TOOLS, seed=seed, max_tokens=30) for seed in range(8)])
    for out in outs:
        choice = out.choices[0]
        if choice.message.tool_calls:
            check_calls(choice)
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content
            assert not choice.message.content.startswith("{")
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS, seed=0, max_tokens=30,
                                            stream=True)
    calls, finish, content = reassemble(stream)
    assert not calls and content[0] == outs[0].choices[0].message.content
    assert finish[0] == outs[0].choices[0].finish_reason
    none = client.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS, tool_choice="none",
                                          max_tokens=5, seed=0)
    bare = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, seed=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    assert none.usage.prompt_tokens > bare.usage.prompt_tokens + 50  # the tools are still described


def test_tool_results_render_like_the_calls(client, engine):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                         max_tokens=40, seed=3)
    check_calls(out.choices[0])
    specs = [tools.ToolSpec("get_weather", "Weather in a city", WEATHER["function"]["parameters"])]
    system = tools.tools_system_prompt(specs, "required")
    prompt = apply_chat_template(engine.tokenizer, messages, system)
    assert out.usage.prompt_tokens == len(prompt)
    text = engine.tokenizer.decode(prompt)
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]}' in text
    assert "[tool result for get_weather]: 18C" in text


# ------------------------------------------------------------------------------------ errors


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nope"}}}},
     "response_format.json_schema.schema"),  # valid to jsonschema, rejected by the grammar compiler
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$schema": 5}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"x-guidance": 5}}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$schema": []}}}]},
     "tools[0].function.parameters"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                             "properties": {"a": {"type": 5}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [CLOCK, {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}]}, "tools[1].function.parameters"),
    ({"tools": [CLOCK, CLOCK]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
]


@pytest.mark.parametrize("fields,param", BAD, ids=[p + f"-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_structured_requests_are_400_with_param(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, extra_body=fields)
    assert e.value.status_code == 400 and e.value.param == param, e.value.message


def test_json_mode_with_tool_choice_none_is_allowed(client):
    out = client.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS, tool_choice="none",
                                         response_format={"type": "json_object"}, max_tokens=20, seed=2)
    assert out.choices[0].finish_reason == "stop" and isinstance(json.loads(out.choices[0].message.content), dict)
