"""Every engine failure reaches the client as an OpenAI-shaped error, on every route and in every mode
(issue 26): chat, completions and responses, each plain and streamed, on uvicorn over the real
engine (the demo model). Faults are injected into the real engine, never a fake one:

- a request fails mid-generation (processing its third token raises in the engine thread): a plain
  request gets a JSON 500 `engine_error`; a stream, already 200, gets an error event and ends (chat
  and completions: `data: {"error": ...}` and no `[DONE]`; responses: an `error` event, then
  `response.failed`);
- the engine itself fails for good (a step raises and so does its recovery): the request in flight
  fails as above, then /ready and /health answer 503 `failed` and every route 503 `engine_failed`;
- a full queue is a 429 and a draining server a 503 on every route.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from api.app import create_app
from api.context import STATE_KEY
from api.settings import ServerSettings
from helpers import KEYS, error_of, wait_idle
from live_server import LiveServer
from llama_jax import running
from llama_jax.engine import Engine, EngineConfig
from llama_jax.running import RunningChoice, SlotTable

DEMO = "llama-jax-demo"
LLAMA2 = "meta-llama/Llama-2-7b-chat-hf"
HELLO = [{"role": "user", "content": "Hello!"}]
ROUTES = {"chat": ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 12}),
          "completions": ("/v1/completions", {"prompt": "Hello", "max_tokens": 12}),
          "responses": ("/v1/responses", {"input": "Hello!", "max_output_tokens": 12})}
NO_EOS = {"2": -100}  # the demo's EOS banned where the route takes logit_bias: the fault always comes first
# (Responses takes no logit_bias: there greedy decoding, whose first tokens are not EOS, does the same)


@pytest.fixture(scope="module")
def live(demo_engine):
    app = create_app(demo_engine, ServerSettings(model_name=DEMO))
    server = LiveServer(app, demo_engine)
    server.ctx = app.state[STATE_KEY]
    yield server
    server.stop()


def request_body(route: str, stream: bool, model: str = DEMO) -> tuple[str, dict]:
    path, body = ROUTES[route]
    extra = {"logit_bias": NO_EOS} if route != "responses" else {"temperature": 0}  # greedy: no EOS before the fault
    return path, {"model": model, **body, **extra, "stream": stream}


def sse_frames(raw: bytes) -> list[tuple[str | None, bytes]]:
    """(event name or None, data) of every SSE event, framing asserted."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    frames = []
    for block in raw[:-2].split(b"\n\n"):
        lines = block.split(b"\n")
        name = lines[0][len(b"event: "):].decode() if lines[0].startswith(b"event: ") else None
        assert lines[-1].startswith(b"data: ") and len(lines) == (2 if name else 1), block
        frames.append((name, lines[-1][len(b"data: "):]))
    return frames


def assert_error_stream(route: str, raw: bytes, code: str, fragment: str) -> None:
    """The stream ended with the route's error event(s), after a normal start."""
    frames = sse_frames(raw)
    if route == "responses":
        (name, data), (last_name, last) = frames[-2], frames[-1]
        error, failed = json.loads(data), json.loads(last)
        assert name == error["type"] == "error" and error["code"] == code and fragment in error["message"], error
        assert last_name == failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
        assert failed["response"]["error"]["code"] == code
        assert frames[0][0] == "response.created" and not any(n == "response.completed" for n, _ in frames)
        numbers = [json.loads(d)["sequence_number"] for _, d in frames]
        assert numbers == list(range(len(frames)))
    else:
        assert frames[-1][1] != b"[DONE]" and all(name is None for name, _ in frames)
        error = json.loads(frames[-1][1])["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
        assert fragment in error["message"]
        assert all("error" not in json.loads(d) for _, d in frames[:-1])


@pytest.fixture(params=["at_once", "one_by_one"])
def third_token_fails(monkeypatch, request, live):
    """Taking a step's tokens raises in the engine thread once a choice has two, on either path a plain step's tokens
    take (running.py): all slots at once (`SlotTable.take_all`, here from one busy slot), where the engine's own
    failure path fails what is running and goes on from fresh state; or one by one (`RunningChoice.take`), where the
    request is released with the error. The demo's EOS ends no reply meanwhile: each reaches its third token."""
    monkeypatch.setattr(live.engine.tokenizer, "eos_ids", ())
    if request.param == "at_once":
        monkeypatch.setattr(running, "AT_ONCE_FROM", 1)
        real = SlotTable.take_all

        def take_all(self, tokens):
            if (self.counts[self.busy, 1] >= 2).any():
                raise RuntimeError("injected fault")
            return real(self, tokens)

        monkeypatch.setattr(SlotTable, "take_all", take_all)
    else:
        real = RunningChoice.take

        def take(self, out, row):
            if self.generated >= 2:
                raise RuntimeError("injected fault")
            return real(self, out, row)

        monkeypatch.setattr(RunningChoice, "take", take)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_a_request_failing_mid_generation_is_an_openai_error(live, third_token_fails, route, stream):
    path, body = request_body(route, stream)
    r = httpx.post(live.url + path, json=body, timeout=60)
    if stream:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert_error_stream(route, r.content, "engine_error", "injected fault")
    else:
        assert r.status_code == 500 and error_of(r)["code"] == "engine_error" and "injected fault" in r.text
    wait_idle(live.engine)


@pytest.mark.parametrize("route", list(ROUTES))
def test_the_openai_client_sees_the_failure(live, third_token_fails, route):
    client = live.client()
    _, body = request_body(route, False)
    del body["stream"]
    create = {"chat": client.chat.completions.create, "completions": client.completions.create,
              "responses": client.responses.create}[route]
    with pytest.raises(openai.InternalServerError) as e:
        create(**body)
    assert e.value.code == "engine_error" and "injected fault" in e.value.message
    if route == "responses":  # Responses streams report errors as typed events
        events = list(create(stream=True, **body))
        assert [e.type for e in events][-2:] == ["error", "response.failed"]
        assert events[-2].code == "engine_error" and events[-1].response.status == "failed"
    else:
        with pytest.raises(openai.APIError, match="injected fault"):
            list(create(stream=True, **body))
    wait_idle(live.engine)


def test_after_a_failure_every_route_serves_again(live):
    for route in ROUTES:
        path, body = request_body(route, False)
        assert httpx.post(live.url + path, json=body, timeout=60).status_code == 200, route


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_an_engine_that_fails_for_good_fails_the_request_then_answers_503(demo_engine, monkeypatch, route,
                                                                           stream):
    """A step raises and so does the recovery: the engine stops, marked failed."""
    engine = Engine(demo_engine.model, demo_engine.tokenizer, EngineConfig(max_slots=2, max_seq_len=64))
    engine.start(warmup=False)
    server = LiveServer(create_app(engine, ServerSettings(model_name=DEMO)), engine)
    try:
        def broken(*_):
            raise RuntimeError("device lost")

        monkeypatch.setattr(engine, "_iterate", broken)
        monkeypatch.setattr(engine, "_replace_state", broken)
        path, body = request_body(route, stream)
        r = httpx.post(server.url + path, json=body, timeout=30)
        if stream:
            assert r.status_code == 200
            assert_error_stream(route, r.content, "engine_error", "device lost")
        else:
            assert r.status_code == 500 and error_of(r)["code"] == "engine_error" and "device lost" in r.text
        for probe in ("/ready", "/health"):
            answer = httpx.get(server.url + probe)
            assert (answer.status_code, answer.json()) == (503, {"status": "failed"}), probe
        for other in ROUTES:
            for other_stream in (False, True):
                path, body = request_body(other, other_stream)
                r = httpx.post(server.url + path, json=body, timeout=30)
                assert r.status_code == 503 and error_of(r)["code"] == "engine_failed", (other, other_stream)
    finally:
        server.stop()
        engine.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_a_full_queue_is_429_on_every_route(strict, route, stream):
    path, body = request_body(route, stream, LLAMA2)
    body.pop("logit_bias", None)
    r = httpx.post(strict.url + path, json=body, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30)
    assert r.status_code == 429 and error_of(r)["code"] == "rate_limit_exceeded"
    assert r.headers["retry-after"] == "3"


def test_a_draining_server_is_503_on_every_route(live):
    live.ctx.draining = True
    try:
        for route in ROUTES:
            for stream in (False, True):
                path, body = request_body(route, stream)
                r = httpx.post(live.url + path, json=body, timeout=30)
                assert r.status_code == 503 and error_of(r)["code"] == "server_shutting_down", (route, stream)
                assert r.headers["retry-after"] == "1"
    finally:
        live.ctx.draining = False
