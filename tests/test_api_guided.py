"""Constraints beyond JSON (issue 26), end to end: vLLM's `structured_outputs` (regex, choice, Lark
grammar, json) and its older `guided_*` fields on /v1/chat/completions and /v1/completions, served
by uvicorn over the real engine on the demo model (random weights: nothing but the grammar keeps a
reply in the language), called with the real `openai` client and raw HTTP. Every reply is checked
with an independent reference: Python's `re.fullmatch`, the choice list, the `lark` package's own
parser, `jsonschema`."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import lark
import pytest

from api.app import create_app
from api.settings import ServerSettings
from helpers import error_of, wait_idle
from live_server import LiveServer
from llama_jax import structured

DEMO = "llama-jax-demo"
HELLO = [{"role": "user", "content": "Hello!"}]
PHONE = r"[0-9]{3}-[a-z]{2,6}( [A-Z][a-z]{1,5})?"
COLOURS = ["red", "green", "blue", "dark violet"]
GREETING = '''start: greeting " " name "!"
greeting: "hello" | "hi" | "hey there"
name: /[a-z]{2,8}/
'''
SUM = '''start: expr
expr: NUMBER | "(" expr "+" expr ")"
NUMBER: /[0-9]{1,3}/
'''
POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
         "required": ["x", "y"], "additionalProperties": False}


@pytest.fixture(scope="module")
def live(demo_engine):
    server = LiveServer(create_app(demo_engine, ServerSettings(model_name=DEMO)), demo_engine)
    yield server
    server.stop()


@pytest.fixture
def client(live):
    return live.client()


def chat(client, seed: int, **fields) -> tuple[str, str]:
    out = client.chat.completions.create(model=DEMO, messages=HELLO, max_tokens=48, seed=seed,
                                         extra_body=fields)
    return out.choices[0].message.content, out.choices[0].finish_reason


def test_regex_fullmatches_for_20_seeds(client):
    """Both spellings, alternating; the demo's first-piece "▁" (a space SentencePiece drops) is
    required by the grammar and never reaches the text."""
    for seed in range(20):
        field = {"guided_regex": PHONE} if seed % 2 else {"structured_outputs": {"regex": PHONE}}
        text, finish = chat(client, seed, **field)
        assert finish == "stop" and re.fullmatch(PHONE, text), (seed, text, finish)


def test_text_that_starts_with_a_space_keeps_it(client):
    """SentencePiece drops a reply's first "▁": the grammar makes the model spend it, so a constrained
    text that starts with a space (or two) still has it after decoding."""
    for seed in range(10):
        text, finish = chat(client, seed, guided_regex=r" [0-9]{2}|  [a-z]{2}")
        assert finish == "stop" and re.fullmatch(r" [0-9]{2}|  [a-z]{2}", text), (seed, text)
        text, _ = chat(client, seed, guided_choice=[" yes", "no", "  maybe"])
        assert text in (" yes", "no", "  maybe"), (seed, text)


def test_regex_on_completions_continues_the_prompt(client):
    """A raw prompt's continuation keeps its leading space, so the grammar offers none: the text
    itself fullmatches (20 seeds, n=2)."""
    for seed in range(10):
        out = client.completions.create(model=DEMO, prompt="Call me at", max_tokens=32, seed=seed, n=2,
                                        extra_body={"guided_regex": PHONE})
        for choice in out.choices:
            assert choice.finish_reason == "stop" and re.fullmatch(PHONE, choice.text), (seed, choice.text)


def test_choice_is_one_of_the_choices(client, demo_engine):
    for seed in range(20):
        field = {"guided_choice": COLOURS} if seed % 2 else {"structured_outputs": {"choice": COLOURS}}
        text, finish = chat(client, seed, **field)
        assert finish == "stop" and text in COLOURS, (seed, text)
    out = client.completions.create(model=DEMO, prompt="My favourite colour is", max_tokens=8, n=4, seed=3,
                                    extra_body={"structured_outputs": {"choice": COLOURS}})
    assert all(c.text in COLOURS and c.finish_reason == "stop" for c in out.choices)
    # the model's own (biased) logits pick among the choices: the constraint only masks
    for colour in COLOURS:
        bias = {str(t): 100 for t in demo_engine.tokenizer.encode(colour)}
        assert chat(client, 0, guided_choice=COLOURS, logit_bias=bias) == (colour, "stop"), colour


@pytest.mark.parametrize("grammar", [GREETING, SUM], ids=["greeting", "nested-sums"])
def test_lark_grammar_output_parses_with_lark(client, grammar):
    parser = lark.Lark(grammar)
    for seed in range(12):
        field = {"guided_grammar": grammar} if seed % 2 else {"structured_outputs": {"grammar": grammar}}
        text, finish = chat(client, seed, **field)
        assert finish == "stop", (seed, text)
        parser.parse(text)  # raises on anything outside the language


def test_json_through_structured_outputs_and_guided_json(client):
    for seed, field in enumerate([{"structured_outputs": {"json": POINT}}, {"guided_json": POINT},
                                  {"guided_json": json.dumps(POINT)}, {"structured_outputs": {"json_object": True}}]):
        text, finish = chat(client, seed, **field)
        assert finish == "stop", (field, text)
        value = json.loads(text)
        if "json_object" not in json.dumps(field):
            jsonschema.validate(value, POINT)
        assert isinstance(value, dict)


def test_streaming_a_constrained_reply_is_the_plain_reply(client):
    args = dict(model=DEMO, messages=HELLO, max_tokens=48, seed=7, extra_body={"guided_regex": PHONE})
    plain = client.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **args)
                       if c.choices)
    assert streamed == plain and re.fullmatch(PHONE, plain)


def test_each_distinct_constraint_is_compiled_once(client, monkeypatch):
    builds = []
    real = structured.Grammar.__init__

    def counting(self, *args, **kwargs):
        builds.append(args[1])
        real(self, *args, **kwargs)

    monkeypatch.setattr(structured.Grammar, "__init__", counting)
    pattern = r"[0-9]{2}x[0-9]{2}"  # used by no other test: not cached yet
    for seed in range(4):
        text, _ = chat(client, seed, guided_regex=pattern)
        assert re.fullmatch(pattern, text)
    chat(client, 0, structured_outputs={"regex": pattern})  # the same constraint through the other field
    assert len(builds) == 1, builds
    assert len(structured._grammars) <= structured._CACHE_SIZE


def test_the_grammar_cache_is_bounded(demo_engine):
    tokenizer = demo_engine.tokenizer
    first = structured.choice_grammar(tokenizer, ["bounded-0"])
    for i in range(structured._CACHE_SIZE + 5):
        structured.choice_grammar(tokenizer, [f"bounded-{i + 1}"])
    assert len(structured._grammars) == structured._CACHE_SIZE
    assert structured.choice_grammar(tokenizer, ["bounded-0"]) is not first  # evicted, then rebuilt


@pytest.mark.parametrize("fields, param, fragment", [
    ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ({"structured_outputs": {"regex": "(?=x)y"}}, "structured_outputs.regex", "look-around"),
    ({"structured_outputs": {"grammar": "start: missing_rule\n"}}, "structured_outputs.grammar", "unknown name"),
    ({"guided_grammar": "start: ("}, "guided_grammar", "Invalid grammar"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}, "guided_json", ""),
    ({"guided_choice": []}, "guided_choice", ""),
    ({"guided_regex": ""}, "guided_regex", "must not be empty"),
    ({"structured_outputs": {}}, "structured_outputs", "needs one of"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice", "Give one"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "Give one"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "not supported"),
    ({"structured_outputs": {"regex": "a", "colour": "red"}}, "structured_outputs", "unknown field"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "response_format"),
    ({"guided_regex": "a", "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
     "guided_regex", "tool calls"),
])
def test_a_constraint_that_cannot_be_used_is_a_400_naming_it(live, fields, param, fragment):
    for path, base in (("/v1/chat/completions", {"messages": HELLO}), ("/v1/completions", {"prompt": "Hi"})):
        if path == "/v1/completions" and ("response_format" in fields or "tools" in fields):
            continue  # chat fields
        r = httpx.post(live.url + path, json={"model": DEMO, "max_tokens": 8, **base, **fields}, timeout=60)
        error = error_of(r)
        assert r.status_code == 400 and error["param"] == param and fragment in error["message"], (path, error)
    wait_idle(live.engine)
