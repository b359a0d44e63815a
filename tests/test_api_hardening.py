"""Issue 13 through a real server on loopback (uvicorn + the demo model `llama-jax serve` runs by
default): every accepted field honoured (logit_bias) or refused (legacy functions, orphan tool
messages), no 500 on hostile input (deep JSON, dropped or slow uploads), the key on every route,
and an engine whose recovery fails says so instead of hanging."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from api.app import create_app
from api.replies import TokenText
from api.validation import MAX_SCHEMA_DEPTH
from api.settings import ServerSettings
from live_server import LiveServer
from llama_jax import checkpoint
from llama_jax.compiles import CompileCounter
from llama_jax.engine import Engine, EngineConfig
from llama_jax.request import SamplingOptions
from llama_jax.tokenizer import apply_chat_template

MODEL = "meta-llama/Llama-2-7b-chat-hf"
HELLO = [{"role": "user", "content": "Hello!"}]
KEY = "the-key"


@pytest.fixture(scope="module")
def live(demo_engine):
    server = LiveServer(create_app(demo_engine, ServerSettings()), demo_engine)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict(demo_engine):
    server = LiveServer(create_app(demo_engine, ServerSettings(api_keys=(KEY,), body_timeout_s=0.5)), demo_engine)
    yield server
    server.stop()


@pytest.fixture
def client(live):
    return live.client()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def bad_request(client, **fields) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, extra_body=fields)
    return e.value


# ------------------------------------------------------------------------------------ logit_bias


def tokens_of(out) -> list[str]:
    return [t.token for t in out.choices[0].logprobs.content]


def test_logit_bias_steers_sampling_without_compiling(live, client):
    greedy = dict(model=MODEL, messages=HELLO, max_tokens=6, temperature=0, logprobs=True)
    client.chat.completions.create(**greedy, logit_bias={"5": 1})  # every program is compiled at warm-up
    tokenizer = live.engine.tokenizer
    forced = tokenizer.encode("hello")[-1]
    with CompileCounter() as compiles:
        plain = client.chat.completions.create(**greedy)
        first = live.engine.generate([apply_chat_template(tokenizer, HELLO)], max_tokens=1,
                                     sampling=SamplingOptions(temperature=0))[0].choices[0].tokens[0].token_id
        up = client.chat.completions.create(**greedy, logit_bias={str(forced): 100})
        down = client.chat.completions.create(**greedy, logit_bias={str(first): -100})
        sampled = client.chat.completions.create(**{**greedy, "temperature": 1.0, "seed": 3},
                                                 logit_bias={str(forced): 100}, n=2)
    assert compiles.count == 0
    text = TokenText(tokenizer)(forced)[0]
    assert tokens_of(up) == [text] * 6 != tokens_of(plain)
    assert tokens_of(down)[0] != tokens_of(plain)[0]
    assert all(t.token == text for c in sampled.choices for t in c.logprobs.content)


@pytest.mark.parametrize("bias,fragment", [
    ({"abc": 1}, "token ids"), ({"-1": 1}, "token ids"), ({"5": 101}, "logit_bias"), ({"5": -100.5}, "logit_bias"),
    ({"5": "x"}, "logit_bias"), ({"2000": 1}, "[0, 2000)"), ({"99999999999": 1}, "token ids"),
    ({str(i): 1 for i in range(301)}, "logit_bias"), ([1, 2], "logit_bias")])
def test_bad_logit_bias_is_a_400(client, bias, fragment):
    e = bad_request(client, logit_bias=bias)
    assert e.param.startswith("logit_bias") and fragment in e.message, (e.param, e.message)


# ------------------------------------------------------------------------------------ refused fields


@pytest.mark.parametrize("field,value", [
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]), ("function_call", "auto"),
    ("function_call", {"name": "f"})])
def test_legacy_functions_are_refused_pointing_at_tools(client, field, value):
    e = bad_request(client, **{field: value})
    assert e.param == field and e.code == "unsupported_parameter"
    assert ("'tools'" if field == "functions" else "'tool_choice'") in e.message


def test_a_tool_message_must_answer_an_earlier_call(client):
    orphan = [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "18C"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=orphan, max_tokens=2)
    assert e.value.param == "messages[1].tool_call_id" and "call_9" in e.value.message
    answered = [orphan[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "w", "arguments": "{}"}}]}, orphan[1]]
    assert client.chat.completions.create(model=MODEL, messages=answered, max_tokens=2).choices


def test_deep_json_is_a_400_not_a_500(live):
    url = live.url + "/v1/chat/completions"
    head = b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], ' % MODEL.encode()
    for deep in (b"[" * 1000 + b"]" * 1000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b"[" * 200):
        r = httpx.post(url, content=head + b'"ignored": ' + deep + b"}", headers={"content-type": "application/json"})
        assert error_of(r, 400)["code"] == "invalid_json"
    schema: dict = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH // 2 + 1):  # two JSON levels each: a deep schema in a shallow-enough body
        schema = {"type": "object", "properties": {"a": schema}}
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}
    err = error_of(httpx.post(url, json={"model": MODEL, "messages": HELLO, "response_format": fmt}), 400)
    assert err["param"] == "response_format.json_schema.schema" and "nested" in err["message"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    err = error_of(httpx.post(url, json={"model": MODEL, "messages": HELLO, "tools": tools}), 400)
    assert err["param"] == "tools[0].function.parameters"


# ------------------------------------------------------------------------------------ auth, uploads


@pytest.mark.parametrize("path", ["/metrics", "/schema", "/schema/openapi.json", "/schema/swagger", "/v1/models"])
def test_the_key_guards_every_route_but_health(strict, path):
    error_of(httpx.get(strict.url + path), 401)
    assert httpx.get(strict.url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(strict.url + "/health").status_code == 200


def test_metrics_public_opens_only_metrics(demo_engine):
    server = LiveServer(create_app(demo_engine, ServerSettings(api_keys=(KEY,), metrics_public=True)))
    try:
        assert httpx.get(server.url + "/metrics").status_code == 200
        error_of(httpx.get(server.url + "/schema/openapi.json"), 401)
    finally:
        server.stop()


def raw_upload(url: str, declared: int, sent: bytes, then_wait: float | None) -> bytes:
    """POST with `declared` Content-Length but only `sent` bytes; then read the reply or hang up."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % declared + sent)
        if then_wait is None:
            return b""
        time.sleep(then_wait)
        return s.recv(65536)


def status_count(url: str, status: int) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    key = f'llama_jax_requests_total{{model_name="{MODEL}",path="/v1/chat/completions",status="{status}"}}'
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(key)), 0.0)


def test_a_client_leaving_mid_upload_counts_as_499(strict):
    before = status_count(strict.url, 499), status_count(strict.url, 500)
    for _ in range(3):
        raw_upload(strict.url, 1000, b'{"model": ', None)
    deadline = time.time() + 10
    while status_count(strict.url, 499) < before[0] + 3 and time.time() < deadline:
        time.sleep(0.05)
    assert (status_count(strict.url, 499), status_count(strict.url, 500)) == (before[0] + 3, before[1])


def test_a_slow_body_is_a_408(strict):
    reply = raw_upload(strict.url, 1000, b'{"model": ', then_wait=1.5)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout", reply


# ------------------------------------------------------------------------------------ engine failure


def test_an_engine_whose_recovery_fails_is_not_ready_and_fails_requests(demo_engine, monkeypatch):
    """A step raises and so does the recovery (fresh device state): the request fails at once, the
    engine is marked failed, and the server answers 503 instead of queueing requests forever."""
    engine = Engine(demo_engine.model, demo_engine.tokenizer, EngineConfig(max_slots=2, max_seq_len=64))
    engine.start(warmup=False)
    server = LiveServer(create_app(engine, ServerSettings()), engine)
    try:
        def broken(*_):
            raise RuntimeError("device lost")

        monkeypatch.setattr(engine, "_iterate", broken)
        monkeypatch.setattr(engine, "_replace_state", broken)
        with pytest.raises(openai.InternalServerError) as e:
            server.client().with_options(timeout=20).chat.completions.create(model=MODEL, messages=HELLO)
        assert e.value.code == "engine_error" and "device lost" in e.value.message
        assert httpx.get(server.url + "/health").json() == {"status": "failed"} and not engine.ready
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
        assert error_of(r, 503)["code"] == "engine_failed"
    finally:
        server.stop()
        engine.stop()


def test_an_impossible_constraint_is_a_400_not_a_fake_stop(demo_checkpoint_dir, tmp_path):
    """The demo model with its DEMO_VERSION 2 tokenizer (on which no JSON can be emitted) used to
    answer '{ "' with finish_reason stop; now the request is refused before it is queued."""
    from test_structured import old_demo_tokenizer

    model = checkpoint.load(demo_checkpoint_dir).model
    engine = Engine(model, old_demo_tokenizer(tmp_path), EngineConfig(max_slots=1, max_seq_len=64))
    engine.start(warmup=False)
    server = LiveServer(create_app(engine, ServerSettings()), engine)
    try:
        schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}  # needs a '"'
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        with pytest.raises(openai.BadRequestError) as e:
            server.client().chat.completions.create(model=MODEL, messages=HELLO, response_format=fmt, max_tokens=20)
        assert e.value.code == "invalid_schema" and "cannot be satisfied" in e.value.message
        assert e.value.param == "response_format.json_schema.schema"
    finally:
        server.stop()
        engine.stop()


def test_the_concurrency_cap_answers_503_server_busy_at_once(demo_engine):
    """`--max-concurrency 1` (api/server.py's cap, as serve wraps the app): while a streaming request
    is in progress (its upload held one byte short, so it cannot finish early) another request gets
    503 `server_busy` with Retry-After at once, /health, /ready and /metrics are still answered, and
    once the stream ends requests are served again."""
    from api.server import limit_concurrency

    server = LiveServer(limit_concurrency(create_app(demo_engine, ServerSettings()), 1, 3), demo_engine)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "stream": True}
    payload = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=60) as held:
            held.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
                         + payload[:-1])
            start = time.monotonic()
            busy = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
            assert busy.status_code == 503 and time.monotonic() - start < 1, busy.text
            assert busy.json()["error"]["code"] == "server_busy" and busy.headers["retry-after"] == "3"
            for path in ("/health", "/ready", "/metrics"):
                assert httpx.get(server.url + path, timeout=10).status_code == 200, path
            held.sendall(payload[-1:])
            reply = b"".join(iter(lambda: held.recv(65536), b""))
            assert reply.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in reply, reply[:300]
        after = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2},
                           timeout=60)
        assert after.status_code == 200, after.text
    finally:
        server.stop()
