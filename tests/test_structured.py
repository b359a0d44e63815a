"""Grammar-constrained decoding on the real Llama 2 tokenizer (llama_jax.structured), without a model:
a "model" that samples uniformly among the allowed tokens is the worst case (it never closes a string
on its own), so every output must still be complete and valid within its budget."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from helpers import CLOCK, WEATHER
from llama_jax import structured as S
from llama_jax import tools as T
from llama_jax import vocabulary as V
from llama_jax.tokenizer import Tokenizer, apply_chat_template, to_meta_dialog
from llama_jax.tools import render_tool_calls

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "kind": {"enum": ["a", "b", 3]},
        "ref": {"$ref": "#/$defs/point"},
    },
    "required": ["name", "age", "address"],
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def walk(constraint, budget: int, rng: np.random.Generator, eos: int = 2) -> tuple[list[int], str]:
    """Generate like the engine does (uniform among the allowed tokens): (tokens, finish_reason)."""
    out: list[int] = []
    for _ in range(budget):
        allowed = constraint.allowed()
        ids = np.flatnonzero(allowed)
        assert len(ids), "an empty mask while not done"
        token = int(rng.choice(ids))
        constraint.advance(token)
        out.append(token)
        if token == eos:
            return out[:-1], "stop"
        if constraint.done():
            return out, "stop"
    return out, "length"


def test_vocabulary_maps_pieces_to_bytes(tokenizer):
    vocab = V.vocabulary(tokenizer)
    assert vocab is V.vocabulary(tokenizer) and vocab.size == 32000
    assert vocab.pieces[tokenizer.encode("hello")[0]] == b" hello"  # "▁" is a space
    assert vocab.pieces[3 + 0x0A] == b"\n" and vocab.pieces[tokenizer.eos_id].startswith(b"\xff")
    for text in ['{"a": 1}', " lead", "naïve ünïcode 😀", "\n\nx"]:  # no dummy-prefix space
        ids = vocab.encode(text)
        assert b"".join(vocab.pieces[i] for i in ids).decode() == text


@pytest.mark.parametrize("schema", [None, PERSON], ids=["json_object", "json_schema"])
def test_random_walks_always_finish_valid(tokenizer, schema):
    grammar = S.json_grammar(tokenizer, schema)
    rng = np.random.default_rng(0)
    for _ in range(20):
        budget = int(rng.integers(1 if schema is None else 60, 150))
        tokens, finish = walk(grammar.constraint(budget), budget, rng)
        text = tokenizer.decode(tokens)
        assert finish == "stop" and len(tokens) <= budget, (budget, text)
        value = json.loads(text)
        assert isinstance(value, dict)
        if schema is not None:
            jsonschema.validate(value, schema)


def test_budget_below_the_shortest_output_ends_with_length(tokenizer):
    grammar = S.json_grammar(tokenizer, PERSON)
    tokens, finish = walk(grammar.constraint(5), 5, np.random.default_rng(0))
    assert finish == "length" and len(tokens) == 5


def test_eos_exactly_when_accepting_and_first_token(tokenizer):
    grammar = S.tools_grammar(tokenizer, [WEATHER], "auto")  # text (accepting) or an envelope
    constraint = grammar.constraint(None)
    first = constraint.allowed()
    vocab = grammar.vocab
    assert not first[vocab.eos_id]  # an empty reply is not an answer
    assert not first[vocab.space_byte] and first[tokenizer.encode("{")[0]]  # "▁{" yes, a kept " " no
    for token in tokenizer.encode("Sure"):
        constraint.advance(token)
        assert constraint.allowed()[vocab.eos_id] == constraint.matcher.is_accepting() is True
    json_constraint = S.json_grammar(tokenizer, None).constraint(None)
    for token in vocab.encode('{"a": [1'):
        assert not json_constraint.allowed()[vocab.eos_id]
        json_constraint.advance(token)
    assert not json_constraint.done()
    for token in vocab.encode("]}"):
        json_constraint.advance(token)
    assert json_constraint.done()


def test_n_choices_get_independent_automata(tokenizer):
    factory = S.json_grammar(tokenizer, None).factory(budget=30, vocab_size=32064)
    a, b = factory(), factory()
    assert a.allowed().shape == (32064,) and not a.allowed()[32000:].any()  # a padded model vocabulary
    a.advance(tokenizer.encode("{")[0])
    assert a.matcher is not b.matcher and b.generated == 0 and a.generated == 1
    assert b.allowed()[tokenizer.encode("{")[0]] and not a.allowed()[tokenizer.encode("{")[0]]


@pytest.mark.parametrize("mode,tools,parallel", [
    ("required", [WEATHER, CLOCK], True), ("required", [WEATHER], False), ("auto", [WEATHER, CLOCK], True)])
def test_tool_envelopes_parse_and_validate(tokenizer, mode, tools, parallel):
    grammar = S.tools_grammar(tokenizer, tools, mode, parallel)
    schemas = {t.name: t.schema for t in tools}
    rng = np.random.default_rng(2)
    seen_calls = 0
    brace = tokenizer.encode("{")  # "▁{": a real model's likely first token
    for i in range(15):
        budget = int(rng.integers(40, 120))
        constraint = grammar.constraint(budget)
        first = brace if mode == "auto" and i % 2 else []  # else (auto) text nearly always wins
        for token in first:
            constraint.advance(token)
        tokens, finish = walk(constraint, budget - len(first), rng)
        text = tokenizer.decode(first + tokens)
        parser = T.parse_tool_calls(text)
        if parser.mode == "content":
            assert mode == "auto" and not text.startswith("{")
            continue
        assert finish == "stop" and parser.complete, text
        assert json.loads(text)["tool_calls"] == [{"name": c.name, "arguments": json.loads(c.arguments)}
                                                  for c in parser.calls]
        assert len(parser.calls) >= 1 and (parallel or len(parser.calls) == 1)
        for call in parser.calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        seen_calls += 1
    assert seen_calls >= (7 if mode == "auto" else 15)


def test_rendered_history_is_what_the_grammar_accepts(tokenizer):
    """An assistant tool call in the conversation is rendered exactly as the model must emit it."""
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                "arguments": '{"city":"Paris","unit":"c"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]
    rendered = render_tool_calls(calls)
    assert rendered == ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
                        '{"name": "get_time", "arguments": {}}]}')
    constraint = S.tools_grammar(tokenizer, [WEATHER, CLOCK], "required").constraint(None)
    for token in V.vocabulary(tokenizer).encode(rendered):
        assert constraint.allowed()[token]
        constraint.advance(token)
    assert constraint.done()
    system = T.tools_system_prompt([WEATHER, CLOCK], "auto")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "noon"}]
    dialog = to_meta_dialog(messages, system)
    assert dialog[0]["content"].startswith("<<SYS>>\nBe brief.\n\n" + system + "\n<</SYS>>\n\n")
    assert dialog[1]["content"] == rendered
    assert dialog[2]["content"] == "[tool result for get_weather]: 18C\n\n[tool result for get_time]: noon"
    plain = [{"role": "user", "content": "Hi"}]
    assert apply_chat_template(tokenizer, plain) == apply_chat_template(tokenizer, plain, None)


def test_bad_schemas_name_the_field(tokenizer):
    with pytest.raises(S.StructuredOutputError) as e:
        S.json_grammar(tokenizer, {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
                       "response_format.json_schema.schema")
    assert e.value.param == "response_format.json_schema.schema" and "missing" in str(e.value)
    with pytest.raises(S.StructuredOutputError) as e:
        bad = T.ToolSpec("bad", None, {"type": "object", "properties": {"x": {"type": "strin"}}})
        S.check_tools(tokenizer, [WEATHER, bad])
    assert e.value.param == "tools[1].function.parameters"
    with pytest.raises(ValueError):
        T.tools_lark([WEATHER], "none")


# ------------------------------------------------------------------------------------ demo tokenizer (issue 13)

STRUCTURAL = ["\n", '\n"', '{"a": 1}', " lead", "\n\nx", "x  y", "  two", "123", '"', "😀"]


@pytest.fixture(scope="module")
def demo_tokenizer(demo_checkpoint_dir) -> Tokenizer:
    return Tokenizer(demo_checkpoint_dir / "tokenizer.model")


def test_demo_tokenizer_encodes_like_llama(demo_tokenizer, tokenizer):
    """Newlines and unseen characters are byte pieces, whitespace is kept, one dummy-prefix "▁"; the
    forced-text encoding structured output relies on is exact, as on Llama 2."""
    for text in STRUCTURAL:
        assert demo_tokenizer.decode(demo_tokenizer.encode(text)) == text == tokenizer.decode(tokenizer.encode(text))
        ids = V.vocabulary(demo_tokenizer).encode(text)
        assert b"".join(V.vocabulary(demo_tokenizer).pieces[i] for i in ids).decode() == text
    assert [demo_tokenizer.id_to_piece(i) for i in demo_tokenizer.encode("\n")] == ["\u2581", "<0x0A>"] == \
        [tokenizer.id_to_piece(i) for i in tokenizer.encode("\n")]


@pytest.mark.parametrize("kind", ["json_object", "json_schema", "tools"])
def test_demo_tokenizer_random_walks_finish_valid(demo_tokenizer, kind):
    """The same worst-case walks as on Llama 2's vocabulary, on the demo's 2000 pieces."""
    grammar = {"json_object": lambda: S.json_grammar(demo_tokenizer, None),
               "json_schema": lambda: S.json_grammar(demo_tokenizer, PERSON),
               "tools": lambda: S.tools_grammar(demo_tokenizer, [WEATHER, CLOCK], "required")}[kind]()
    rng = np.random.default_rng(1)
    for _ in range(10):
        budget = int(rng.integers(80, 150))
        tokens, finish = walk(grammar.constraint(budget), budget, rng, eos=demo_tokenizer.eos_id)
        text = demo_tokenizer.decode(tokens)
        assert finish == "stop", (budget, text)
        value = json.loads(text)
        if kind == "json_schema":
            jsonschema.validate(value, PERSON)
        if kind == "tools":
            assert T.parse_tool_calls(text).complete and value["tool_calls"]


def old_demo_tokenizer(tmp_path) -> Tokenizer:
    """The demo tokenizer as DEMO_VERSION 2 trained it (SentencePiece's default normaliser: "\\n" encodes
    to nothing), on which the JSON grammars can never emit a bare '"'."""
    import sentencepiece as spm

    from llama_jax import demo

    lines = [line for f in sorted(Path(demo.__file__).parent.glob("*.py")) for line in f.read_text().splitlines()
             if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "old"),
                                   vocab_size=demo.DEMO_VOCAB, model_type="bpe", byte_fallback=True, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    return Tokenizer(tmp_path / "old.model")


def test_an_unsatisfiable_grammar_is_refused_up_front(tmp_path):
    """Never a fake "stop": a grammar no token sequence completes fails when it is built (a 400)."""
    old = old_demo_tokenizer(tmp_path)
    with pytest.raises(S.StructuredOutputError, match="cannot be satisfied") as e:
        S.json_grammar(old, PERSON, "response_format.json_schema.schema")
    assert e.value.param == "response_format.json_schema.schema"


def test_a_dead_end_raises_instead_of_forcing_eos(tokenizer):
    constraint = S.json_grammar(tokenizer, None).constraint(None)
    constraint.advance(tokenizer.encode("hello")[0])  # not JSON: the matcher is now in error
    with pytest.raises(S.StructuredOutputError, match="left its grammar"):
        constraint.allowed()
