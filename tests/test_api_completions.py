"""The legacy completions API end to end: uvicorn on 127.0.0.1 serving a real Engine on the tiny
random model, called with the real `openai` client (and httpx for raw error bodies); prompt and
generated logprobs are checked against Hugging Face on the same weights."""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest
import torch

from api.app import create_app
from api.replies import TokenText
from api.settings import ServerSettings
from live_server import LiveServer
from llama_jax.engine import Engine, EngineConfig
from llama_jax.hf_checkpoint import load_hf_model
from llama_jax.tokenizer import Tokenizer
from helpers import KEYS, error_of, hf_log_softmax, hf_model, wait_idle

MODEL = "meta-llama/Llama-2-7b-chat-hf"  # the servers' default name
PRICE_IN, PRICE_OUT = 0.5, 1.5
TEXT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    return tiny_checkpoint("tiny-gqa")


@pytest.fixture(scope="module")
def hf(path):
    return hf_model(path)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def live(path, tokenizer):
    config = EngineConfig(max_slots=4, max_seq_len=128, min_prefill_bucket=32)
    engine = Engine(load_hf_model(path), tokenizer, config).start(warmup=False)  # compiles what the tests use
    server = LiveServer(create_app(engine, ServerSettings(price_input_per_mtok=PRICE_IN,
                                                          price_output_per_mtok=PRICE_OUT)), engine)
    yield server
    server.stop()
    engine.stop()


@pytest.mark.parametrize("prefix", ["/v1", "/v1/openai"])
def test_echo_with_max_tokens_0_scores_the_prompt_like_hf(live, hf, tokenizer, prefix):
    """A string prompt gets BOS prepended; echo returns it with a null first logprob, the rest
    equal to HF's log_softmax (1e-4) and the top-3 alternatives HF's likeliest tokens."""
    out = live.client(prefix).completions.create(model=MODEL, prompt=TEXT, max_tokens=0, echo=True, logprobs=3)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == MODEL
    (choice,) = out.choices
    ids = [tokenizer.bos_id, *tokenizer.encode(TEXT)]
    assert choice.text == TEXT and choice.finish_reason == "length" and choice.index == 0
    lp = choice.logprobs
    assert lp.tokens[0] == "<s>" and lp.tokens[1:] == [tokenizer.id_to_piece(i).replace("\u2581", " ") for i in ids[1:]]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = hf_log_softmax(hf, ids)
    assert np.abs(np.array(lp.token_logprobs[1:]) - ref[np.arange(len(ids) - 1), ids[1:]]).max() <= 1e-4
    for top, row in zip(lp.top_logprobs[1:], ref[:-1]):
        assert len(top) == 3 and max(top.values()) == pytest.approx(row.max(), abs=1e-4)
    assert lp.text_offset[:3] == [0, 0, 3]
    assert all(TEXT[o:].startswith(t) for o, t in zip(lp.text_offset[2:], lp.tokens[2:]))
    u = out.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), 0, len(ids))
    assert u.model_extra["estimated_cost"] == pytest.approx(len(ids) * PRICE_IN / 1e6)


def test_echo_with_generation_continues_the_prompt(live, hf, tokenizer):
    """Token ids are used as given (no BOS added); greedy tokens are HF's, their logprobs HF's,
    and the text continues the prompt exactly as decoding prompt + completion does."""
    ids = tokenizer.encode(" Once upon a time")  # no BOS: used exactly as given
    out = live.client().completions.create(model=MODEL, prompt=ids, max_tokens=6, echo=True, logprobs=2,
                                           temperature=0)
    (choice,) = out.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 6 and lp.token_logprobs[0] is None and choice.finish_reason == "length"
    with torch.no_grad():
        full = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0].tolist()
    assert lp.tokens[len(ids):] == [TokenText(tokenizer)(i)[0] for i in full[len(ids):]]
    ref = hf_log_softmax(hf, full)
    assert np.abs(np.array(lp.token_logprobs[1:]) - ref[np.arange(len(full) - 1), full[1:]]).max() <= 1e-4
    assert choice.text == tokenizer.decode(full)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(ids)] == len(tokenizer.decode(ids))
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 6


def test_batched_token_prompts_and_n_order_choices_by_prompt(live, tokenizer):
    prompts = [[1, 450, 4996], [1, 17354, 1701, 29889]]
    out = live.client().completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2, seed=5, logprobs=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == 12
    assert all(len(c.logprobs.tokens) == 3 and all(t == {} for t in c.logprobs.top_logprobs) for c in out.choices)
    assert not tokenizer.decode(prompts[0]) in out.choices[0].text  # no echo
    again = live.client().completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2, seed=5, logprobs=0)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # the seed reproduces


def test_streaming_matches_the_plain_reply(live):
    args = dict(model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=8, echo=True, logprobs=1, seed=3,
                temperature=0.9, top_p=0.95, stop=["\n"])
    plain = live.client().completions.create(**args)
    chunks = list(live.client().completions.create(stream=True, stream_options={"include_usage": True}, **args))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == plain.usage.completion_tokens
    for choice in plain.choices:
        mine = [c.choices[0] for c in body if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert sum((c.logprobs.tokens for c in mine), []) == choice.logprobs.tokens
        assert sum((c.logprobs.text_offset for c in mine), []) == choice.logprobs.text_offset
        assert [c.finish_reason for c in mine][-1] == choice.finish_reason and mine[0].text in ("Hello", "Goodbye")
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)


def test_a_client_that_leaves_frees_the_slots_of_every_prompt(live):
    body = {"model": MODEL, "prompt": ["Hello", "Goodbye"], "n": 2, "max_tokens": 100, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        next(response.iter_lines())
        assert live.engine.busy_slots > 0
    wait_idle(live.engine)


def test_logit_bias_steers_completions_as_in_chat(live):
    client = live.client()
    greedy = dict(model=MODEL, prompt=TEXT, max_tokens=4, temperature=0, logprobs=0)
    plain = client.completions.create(**greedy).choices[0]
    forced = client.completions.create(**greedy, logit_bias={"450": 100}).choices[0]
    tokens = forced.logprobs.tokens
    assert len(tokens) == 4 and len(set(tokens)) == 1 and forced.text == tokens[0] * 4
    assert tokens != plain.logprobs.tokens


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    ({"model": MODEL, "prompt": []}, 400, "prompt", "invalid_type"),
    ({"model": MODEL, "prompt": [1, "a"]}, 400, "prompt", "invalid_type"),
    ({"model": MODEL, "prompt": [[1, 2], []]}, 400, "prompt", "invalid_type"),
    ({"model": MODEL, "prompt": [1, 32000]}, 400, "prompt", "invalid_value"),
    ({"model": MODEL, "prompt": [1] * 128}, 400, "prompt", "context_length_exceeded"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 200}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 6}, 400, "logprobs", "invalid_value"),
    ({"model": MODEL, "prompt": "hi", "logprobs": True}, 400, "logprobs", "invalid_type"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": MODEL, "prompt": "hi", "suffix": "x"}, 400, "suffix", "unsupported_parameter"),
    ({"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias.abc", "invalid_value"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"4": 1, "5": 101}}, 400, "logit_bias.5", "invalid_value"),
    ({"model": MODEL, "prompt": "hi", "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"model": MODEL, "prompt": "hi", "n": 129}, 400, "n", "invalid_value"),
    ({"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop", "invalid_value"),
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    ({"model": MODEL, "prompt": ["hi"] * 33}, 400, "prompt", "invalid_value"),
    ({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}, 404, "model", "model_not_found"),
])
def test_bad_requests_get_openai_errors(live, body, status, param, code):
    response = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert (error["param"], error["code"]) == (param, code), error


def test_the_limits_of_chat_apply(strict):
    """API keys (401), the queue (429 + Retry-After), the body limit (413) and warm-up (503)."""
    with pytest.raises(openai.AuthenticationError):
        strict.client(key="wrong").completions.create(model=MODEL, prompt="hi")
    with pytest.raises(openai.RateLimitError) as e:
        strict.client(key=KEYS[0]).completions.create(model=MODEL, prompt=["hi", "there"])
    assert e.value.response.headers["retry-after"] == "3" and strict.engine.queue_depth == 0
    big = json.dumps({"model": MODEL, "prompt": "x" * 5000})
    r = httpx.post(strict.url + "/v1/completions", content=big, headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    strict.engine.ready = False
    try:
        with pytest.raises(openai.APIStatusError) as e:
            strict.client(key=KEYS[0]).completions.create(model=MODEL, prompt="hi")
        assert e.value.status_code == 503 and e.value.code == "model_not_ready"
    finally:
        strict.engine.ready = True
