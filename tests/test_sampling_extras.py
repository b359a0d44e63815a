"""vLLM's common sampling extras in the engine (tiny random model, real Llama 2 tokenizer):
`min_tokens` bans the stop ids (and ignores stop strings) until reached, stop ids are a set
that can hold several EOS ids, and none of it compiles anything after warm-up."""

import pytest

from llama_jax.compiles import CompileCounter
from llama_jax.engine import Engine, EngineConfig
from llama_jax.request import Request, RequestError, SamplingOptions

EOS = 2
HELLO = [1, 15043, 29991]


@pytest.fixture(scope="module")
def engine(tiny_model, tokenizer):
    with Engine(tiny_model, tokenizer, EngineConfig(max_slots=4, max_seq_len=64)) as e:
        yield e


def run(engine, **fields):
    fields.setdefault("sampling", SamplingOptions(seed=1))
    return engine.submit(Request(prompt=HELLO, **fields)).result().choices[0]


def forcing(token: int, **options) -> SamplingOptions:
    """Sampling that all but forces `token` at every step (logit_bias +100)."""
    return SamplingOptions(seed=1, logit_bias=((token, 100.0),), **options)


def test_min_tokens_bans_eos_until_reached(engine):
    run(engine, max_tokens=2)  # the first freed slot compiles its row reset
    with CompileCounter() as compiles:
        plain = run(engine, max_tokens=20, sampling=forcing(EOS))
        held = run(engine, max_tokens=20, min_tokens=5, sampling=forcing(EOS))
        greedy = run(engine, max_tokens=20, min_tokens=3, sampling=forcing(EOS, temperature=0))
    assert compiles.count == 0
    assert [t.token_id for t in plain.tokens] == [EOS] and plain.finish_reason == "stop"
    assert len(held.tokens) == 6 and held.finish_reason == "stop"  # 5 others, then the EOS they held back
    assert EOS not in [t.token_id for t in held.tokens[:5]] and held.tokens[5].token_id == EOS
    assert len(greedy.tokens) == 4 and greedy.tokens[-1].token_id == EOS


def test_min_tokens_bans_every_stop_id_and_ignores_stop_strings(engine, tokenizer):
    word = tokenizer.encode("hello")[-1]
    out = run(engine, max_tokens=10, min_tokens=4, stop_token_ids=[word, EOS], sampling=forcing(word))
    assert len(out.tokens) == 5 and word not in [t.token_id for t in out.tokens[:4]]
    assert out.tokens[4].token_id == word and out.finish_reason == "stop"
    text = run(engine, max_tokens=10, min_tokens=3, stop_token_ids=[], stop=["hello"], sampling=forcing(word))
    assert [t.token_id for t in text.tokens] == [word] * 3 and text.finish_reason == "stop"
    assert text.text.count("hello") == 2  # tokens 1 and 2 could not stop; token 3 completes the stop string


def test_stop_ids_are_a_set_replacing_eos(engine, tokenizer):
    word = tokenizer.encode("hello")[-1]
    handle = engine.submit(Request(prompt=HELLO, max_tokens=1))
    assert handle.stop_ids == frozenset(tokenizer.eos_ids) and handle.result().choices[0].tokens
    ignoring = run(engine, max_tokens=6, stop_token_ids=[], sampling=forcing(EOS))  # the API's ignore_eos
    assert [t.token_id for t in ignoring.tokens] == [EOS] * 6 and ignoring.finish_reason == "length"
    several = run(engine, max_tokens=6, stop_token_ids=[word, EOS, word], sampling=forcing(word))
    assert [t.token_id for t in several.tokens] == [word] and several.finish_reason == "stop"


@pytest.mark.parametrize("fields,param", [
    ({"min_tokens": 7, "max_tokens": 6}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
    ({"stop_token_ids": [32000]}, "stop_token_ids"), ({"stop_token_ids": list(range(65))}, "stop_token_ids")])
def test_bad_extras_are_request_errors(engine, fields, param):
    with pytest.raises(RequestError) as e:
        engine.submit(Request(prompt=HELLO, **fields))
    assert e.value.param == param and e.value.code == "invalid_value"
