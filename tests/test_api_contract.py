"""Issue 31's OpenAI contract through a real server on loopback (uvicorn + the demo model): vLLM's
sampling extras (`min_tokens`, `ignore_eos`, `stop_token_ids`) honoured on both routes, the
`developer` role, `n` beyond the free slots, `max_tokens: 0` refused on chat, and one set of error
codes and `param` paths, which must be the ones docs/serving.md's error table lists."""

from __future__ import annotations

import re

import httpx
import pytest

from api.app import create_app
from api.settings import ServerSettings
from helpers import error_of
from live_server import REPO_ROOT, LiveServer

MODEL = "meta-llama/Llama-2-7b-chat-hf"
HELLO = [{"role": "user", "content": "Hello!"}]
seen: set[tuple[int, str]] = set()  # (status, code) of every error these tests got, for the docs check


@pytest.fixture(scope="module")
def live(demo_engine):
    server = LiveServer(create_app(demo_engine, ServerSettings()), demo_engine)
    yield server
    server.stop()


def post(live, path: str, body: dict) -> httpx.Response:
    response = httpx.post(live.url + path, json=body, timeout=120)
    if response.status_code >= 400:
        seen.add((response.status_code, error_of(response)["code"]))
    return response


def chat(live, **fields) -> httpx.Response:
    return post(live, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, **fields})


def eos(live) -> int:
    return live.engine.tokenizer.eos_id


# ------------------------------------------------------------------------------------ sampling extras


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_min_tokens_holds_eos_back(live, path):
    force_eos = {"logit_bias": {str(eos(live)): 100}, "max_tokens": 20, "seed": 1, "logprobs": True}
    body = {"model": MODEL, **({"messages": HELLO} if "chat" in path else {"prompt": "Hello"}), **force_eos}
    body["logprobs"] = True if "chat" in path else 0
    plain = post(live, path, body).json()
    held = post(live, path, {**body, "min_tokens": 5}).json()
    assert plain["usage"]["completion_tokens"] == 1 and plain["choices"][0]["finish_reason"] == "stop"
    assert held["usage"]["completion_tokens"] == 6 and held["choices"][0]["finish_reason"] == "stop"


def test_ignore_eos_runs_to_max_tokens(live):
    body = {"logit_bias": {str(eos(live)): 100}, "max_tokens": 7, "seed": 1}
    stopped = chat(live, **body).json()
    ignoring = chat(live, **body, ignore_eos=True).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 1
    assert ignoring["choices"][0]["finish_reason"] == "length" and ignoring["usage"]["completion_tokens"] == 7


def test_stop_token_ids_end_a_choice_without_their_text(live):
    tokenizer = live.engine.tokenizer
    word = tokenizer.encode("hello")[-1]
    body = {"logit_bias": {str(word): 100}, "max_tokens": 6, "seed": 1}
    free = chat(live, **body, ignore_eos=True).json()["choices"][0]
    stopped = chat(live, **body, stop_token_ids=[word]).json()
    assert "choices" in stopped, stopped
    stopped = stopped["choices"][0]
    assert free["finish_reason"] == "length" and free["message"]["content"]
    assert stopped["finish_reason"] == "stop" and stopped["message"]["content"] == ""
    done = post(live, "/v1/completions", {"model": MODEL, "prompt": "Hi", **body, "stop_token_ids": [word],
                                           "ignore_eos": True}).json()
    assert done["choices"][0]["finish_reason"] == "stop" and done["usage"]["completion_tokens"] == 1


# ------------------------------------------------------------------------------------ OpenAI contract


def test_developer_role_is_the_system_role(live):
    tokenizer = live.engine.tokenizer
    from llama_jax.tokenizer import apply_chat_template

    as_developer = [{"role": "developer", "content": "Answer in one word."}, *HELLO]
    as_system = [{"role": "system", "content": "Answer in one word."}, *HELLO]
    assert apply_chat_template(tokenizer, as_developer) == apply_chat_template(tokenizer, as_system)
    reply = chat(live, messages=as_developer, max_tokens=4, temperature=0).json()
    same = chat(live, messages=as_system, max_tokens=4, temperature=0).json()
    assert reply["choices"][0]["message"] == same["choices"][0]["message"]
    assert reply["usage"]["prompt_tokens"] == same["usage"]["prompt_tokens"]


def test_n_beyond_the_free_slots_is_queued(live):
    slots = live.engine.config.max_slots
    out = chat(live, n=2 * slots, max_tokens=3, seed=5).json()
    assert [c["index"] for c in out["choices"]] == list(range(2 * slots))
    assert out["usage"]["completion_tokens"] <= 6 * slots and len({c["message"]["content"] for c in out["choices"]}) > 1
    raw = httpx.post(live.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": HELLO, "n": 16, "max_tokens": 2, "stream": True}).text
    finished = re.findall(r'"index":(\d+),"delta":\{\},"logprobs":null,"finish_reason":"(?:length|stop)"', raw)
    assert sorted(map(int, finished)) == list(range(16)) and raw.endswith("data: [DONE]\n\n")


def test_max_tokens_0_is_refused_on_chat_but_scores_on_completions(live):
    for field in ("max_tokens", "max_completion_tokens"):
        r = chat(live, **{field: 0})
        assert r.status_code == 400 and error_of(r)["param"] == field
    scored = post(live, "/v1/completions", {"model": MODEL, "prompt": "Hello there", "max_tokens": 0, "echo": True,
                                            "logprobs": 1}).json()
    assert scored["choices"][0]["text"] == "Hello there" and scored["usage"]["completion_tokens"] == 0


CHAT_ERRORS = [
    ({"logit_bias": {"abc": 1}}, "logit_bias.abc", "invalid_value"),
    ({"logit_bias": {"4": 1, "7": 101}}, "logit_bias.7", "invalid_value"),
    ({"logit_bias": {"99999": 1}}, "logit_bias.99999", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text",
     "invalid_type"),
    ({"messages": [{"role": "user", "content": "x " * 600}]}, "messages", "context_length_exceeded"),
    ({"max_tokens": 600}, "max_tokens", "context_length_exceeded"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "invalid_value"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids", "invalid_value"),
    ({"stop_token_ids": list(range(33))}, "stop_token_ids", "invalid_value"),
    ({"n": 129}, "n", "invalid_value"),
    ({"n": "two"}, "n", "invalid_type"),
]


@pytest.mark.parametrize("fields,param,code", CHAT_ERRORS, ids=[p for _, p, _ in CHAT_ERRORS])
def test_chat_errors_name_the_exact_field(live, fields, param, code):
    r = chat(live, max_tokens=2, **fields) if "max_tokens" not in fields else chat(live, **fields)
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error


def test_completions_context_error_talks_about_the_prompt(live):
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": "x " * 600})
    error = error_of(r)
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    assert "prompt" in error["message"] and "messages" not in error["message"]


def test_a_lone_surrogate_escape_is_named(live):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % MODEL.encode()
    r = httpx.post(live.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    seen.add((r.status_code, error_of(r)["code"]))
    error = error_of(r)
    assert r.status_code == 400 and error["code"] == "invalid_json"
    assert "\\ud800" in error["message"] and "surrogate" in error["message"] and "truncated" not in error["message"]
    pair = body.replace(b"\\ud800", b"\\ud83d\\ude00").replace(b"}]}", b"}], \"max_tokens\": 1}")
    assert httpx.post(live.url + "/v1/chat/completions", content=pair, timeout=60).status_code == 200


def test_every_error_code_seen_is_in_the_docs_table(live):
    """Runs last in this module: every (status, code) the tests above got is a row of the table in
    docs/serving.md#errors, and the table lists no code this server never sends (`invalid_request`)."""
    for extra in ({"model": "other"}, {"stream_options": {"include_usage": True}}, {"functions": []},
                  {"frobnicate": 1}):
        chat(live, **extra)
    post(live, "/v1/chat/completions", {"model": MODEL})
    missing = httpx.get(live.url + "/v1/nope")
    seen.add((missing.status_code, error_of(missing)["code"]))
    text = (REPO_ROOT / "docs" / "serving.md").read_text()
    table = text[text.index("## Errors"):text.index("## Legacy completions")]
    documented = {(int(status), code) for status, codes in re.findall(r"^\| (\d{3}) \| (.*?) \|", table, re.M)
                  for code in re.findall(r"`([a-z_]+)`", codes)}
    assert len(seen) >= 9 and seen <= documented, (seen - documented, sorted(seen))
    assert "invalid_request" not in {code for _, code in documented}
