"""The OpenAI-compatible server, end to end: uvicorn on 127.0.0.1 serving a real Engine on the tiny
random model, called with the real `openai` package (sync, async, streaming), raw httpx (exact SSE
bytes, error bodies) and the seed page's curl commands verbatim.

Two servers: `live` (8 slots, 256 context, prices set, no keys) and `strict` (API keys, a 4 KiB body
limit, and an engine with `max_queue=0`, so every admitted request meets a full queue: the real
QueueFullError path, deterministically). No fake engine is used here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from api.app import create_app
from api.settings import ServerSettings
from live_server import LiveServer
from llama_jax.engine import Engine, EngineConfig
from helpers import KEYS, error_of, wait_idle
from llama_jax.request import SamplingOptions
from llama_jax.tokenizer import Tokenizer, apply_chat_template

MODEL = "meta-llama/Llama-2-7b-chat-hf"
PRICE_IN, PRICE_OUT = 0.5, 1.5
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def live(model, tokenizer_path):
    config = EngineConfig(max_slots=8, max_seq_len=256, min_prefill_bucket=32)
    engine = Engine(model, Tokenizer(tokenizer_path), config).start()
    server = LiveServer(create_app(engine, ServerSettings(price_input_per_mtok=PRICE_IN,
                                                          price_output_per_mtok=PRICE_OUT)), engine)
    yield server
    server.stop()
    engine.stop()


@pytest.fixture
def client(live):
    return live.client()


def sse_events(raw: bytes) -> list[bytes]:
    """Split an SSE body exactly as framed: every event is `data: ...` then a blank line."""
    assert raw.endswith(b"\n\n") and b"\r" not in raw
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), raw[:500]
    return [e[len(b"data: "):] for e in events]


# ------------------------------------------------------------------------------------ happy paths


@pytest.mark.parametrize("prefix", ["/v1", "/v1/openai"])
def test_sync_completion_has_openai_shape(live, prefix):
    out = live.client(prefix).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, seed=1)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == MODEL
    assert abs(out.created - time.time()) < 60
    (choice,) = out.choices
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    u = out.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 8 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    expected = u.prompt_tokens * PRICE_IN / 1e6 + u.completion_tokens * PRICE_OUT / 1e6
    assert u.model_extra["estimated_cost"] == pytest.approx(expected)


def test_async_client_serves_concurrent_requests(live):
    async def run():
        async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
            return await asyncio.gather(*(c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12,
                                                                    seed=s, temperature=1.0) for s in range(6)))

    outs = asyncio.run(run())
    assert all(o.choices[0].finish_reason in ("stop", "length") for o in outs)
    assert len({o.choices[0].message.content for o in outs}) > 1  # different seeds, different replies


def test_streaming_matches_the_plain_reply(client):
    args = dict(model=MODEL, messages=HELLO, max_tokens=20, seed=7, temperature=0.8)
    plain = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, **args))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id and c.usage is None for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks][-1] == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].choices[0].delta.content is None and chunks[-1].choices[0].delta.role is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content


def test_n2_streaming_interleaves_choices_and_ends_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, n=2, max_tokens=16, seed=3, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    order = [c.choices[0].index for c in body]
    assert order[:2] == [0, 1]  # role chunks first, in index order
    assert set(order[2:]) == {0, 1} and order[2:] != sorted(order[2:]), "choices interleave as tokens arrive"
    texts = {0: "", 1: ""}
    for i in (0, 1):
        mine = [c.choices[0] for c in body if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason in ("stop", "length")
        assert all(ch.finish_reason is None for ch in mine[:-1])
        texts[i] = "".join(ch.delta.content or "" for ch in mine)
    assert texts[0] != texts[1]
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, n=2, max_tokens=16, seed=3)
    assert [c.message.content for c in plain.choices] == [texts[0], texts[1]]
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_raw_sse_bytes_and_done(live):
    body = {"model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 6, "stream_options": {"include_usage": True}}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert list(chunks[0]) == ["id", "object", "created", "model", "choices", "usage"]
    assert list(chunks[0]["choices"][0]) == ["index", "delta", "logprobs", "finish_reason"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stop_string_ends_the_reply_before_it(client):
    greedy = dict(model=MODEL, messages=HELLO, max_tokens=30, temperature=0)
    text = client.chat.completions.create(**greedy).choices[0].message.content
    assert len(text) > 12
    stop = text[6:10]
    out = client.chat.completions.create(stop=["never-appears", stop], **greedy)
    assert out.choices[0].message.content == text[: text.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    single = client.chat.completions.create(stop=stop, **greedy)  # a plain string works too
    assert single.choices[0].message.content == out.choices[0].message.content


def test_seed_reproduces_and_differs(client):
    args = dict(model=MODEL, messages=HELLO, max_tokens=24, temperature=1.0, top_p=0.95)
    a, b = (client.chat.completions.create(seed=1234, **args).choices[0].message.content for _ in range(2))
    c = client.chat.completions.create(seed=4321, **args).choices[0].message.content
    assert a == b and a != c


def test_max_tokens_gives_length_and_alias(client):
    out = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    alias = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=5, temperature=0)
    assert alias.choices[0].message.content == out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:  # OpenAI and vLLM refuse it on chat
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=0)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, max_completion_tokens=6)
    assert e.value.param == "max_completion_tokens"


def test_logprobs_plain_and_streamed(client, live):
    args = dict(model=MODEL, messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    out = client.chat.completions.create(**args)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy
        if t.bytes is not None:
            assert bytes(t.bytes).decode("utf-8", "backslashreplace") == t.token
    streamed = [c for c in client.chat.completions.create(stream=True, **args) if c.choices and c.choices[0].logprobs]
    assert [t.token for c in streamed for t in c.choices[0].logprobs.content] == [t.token for t in content]
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, logprobs=True)
    assert all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)


def test_user_and_extension_fields_are_accepted(client):
    """(An unknown field is a 400 naming it: tests/test_api_parity.py.)"""
    out = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, user="u-123",
                                         tool_choice="none", response_format={"type": "text"},
                                         extra_body={"min_p": 0.05, "top_k": 40, "repetition_penalty": 1.1})
    assert out.choices[0].finish_reason in ("stop", "length")


def test_conversation_with_system_tool_and_parts(client):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert out.usage.prompt_tokens > 20


# ------------------------------------------------------------------------------------ validation


OUT_OF_RANGE = [
    ("temperature", -0.1), ("temperature", 2.01), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5),
    ("min_p", -0.01), ("min_p", 1.01), ("top_k", -1), ("top_k", 1000), ("top_k", 2.5),
    ("max_tokens", -1), ("max_tokens", 1_000_001), ("max_completion_tokens", -1), ("n", 0), ("n", 129),
    ("presence_penalty", -2.01), ("presence_penalty", 2.01), ("frequency_penalty", -3), ("frequency_penalty", 2.5),
    ("repetition_penalty", 0.009), ("repetition_penalty", 5.01), ("seed", -1), ("seed", 2**63),
    ("stop", [str(i) for i in range(17)]), ("stop", [""]), ("stop", ""), ("stop", 5), ("stream", "yes"),
    ("logprobs", "yes"), ("top_logprobs", 5), ("user", 5), ("messages", []), ("messages", "hi"), ("model", 7),
    ("tools", [{"type": "function"}]), ("tools", "all"), ("tool_choice", "sometimes"), ("tool_choice", "required"),
    ("response_format", {"type": "xml"}), ("stream_options", {"include_usage": True}),
]


@pytest.mark.parametrize("field,value", OUT_OF_RANGE, ids=[f"{f}={v!r}"[:40] for f, v in OUT_OF_RANGE])
def test_every_bad_field_is_a_400_naming_it(client, field, value):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2, field: value}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": MODEL, "messages": HELLO}, extra_body=body)
    assert e.value.status_code == 400
    assert e.value.param == field or e.value.param.startswith((field + "[", field + ".")), (e.value.param, e.value.message)
    assert isinstance(e.value.code, str)


def test_top_logprobs_range_with_logprobs(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, logprobs=True, top_logprobs=21)
    assert e.value.param == "top_logprobs"


@pytest.mark.parametrize("messages,param", [
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "content": "hi"}], "messages"),  # the template needs a user turn last
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0].type"),
])
def test_bad_messages_name_the_field(client, messages, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages)
    assert e.value.param == param


def test_tools_and_json_mode_are_served(client):
    """Structured output is issue 7 (tests/test_api_tools.py); here only that it is no longer refused."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    out = client.chat.completions.create(model=MODEL, messages=HELLO, tools=tools, tool_choice="required",
                                         max_tokens=30, seed=1)
    assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.tool_calls[0].function.name == "f"
    out = client.chat.completions.create(model=MODEL, messages=HELLO, response_format={"type": "json_object"},
                                         max_tokens=20, seed=1)
    assert out.choices[0].finish_reason == "stop" and json.loads(out.choices[0].message.content) is not None
    out = client.chat.completions.create(model=MODEL, messages=HELLO, tools=tools, tool_choice="none", max_tokens=1)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=250)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 300}], stream=True)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"


def test_missing_and_unknown_model(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"model": None})
    assert e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body={"messages": HELLO}, cast_to=object)
    assert e.value.param == "model" and e.value.code == "missing_required_parameter"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message


@pytest.mark.parametrize("raw", [b'{"model": "meta-llama/Llama-2-7b-chat-hf", "messages": [', b"", b"not json",
                                 b"[1, 2]", b'{"model": NaN}'])
def test_malformed_json_is_a_400(live, raw):
    r = httpx.post(live.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["code"] in ("invalid_json", "invalid_type")


def test_litestar_errors_are_openai_shaped(live):
    r = httpx.get(live.url + "/v1/chat/completions")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
    r = httpx.post(live.url + "/v1/embeddings", json={})
    assert r.status_code == 404 and error_of(r)["code"] == "unknown_url"


# ------------------------------------------------------------------------------------ seed page

SEED_CURLS = [  # verbatim from the seed page; only the host is replaced at run time
    '''curl "https://api.deepinfra.com/v1/openai/chat/completions" \\
  -H "Content-Type: application/json" \\
  -H "Authorization: Bearer $DEEPINFRA_TOKEN" \\
  -d '{
      "model": "meta-llama/Llama-2-7b-chat-hf",
      "messages": [
        {
          "role": "user",
          "content": "Hello!"
        }
      ]
    }\'''',
    '''curl "https://api.deepinfra.com/v1/openai/chat/completions" \\
  -H "Content-Type: application/json" \\
  -H "Authorization: Bearer $DEEPINFRA_TOKEN" \\
  -d '{
      "model": "meta-llama/Llama-2-7b-chat-hf",
      "messages": [
        {
            "role": "system",
            "content": "Respond like a michelin starred chef."
        },
        {
          "role": "user",
          "content": "Can you name at least two different techniques to cook lamb?"
        },
        {
          "role": "assistant",
          "content": "Bonjour! Let me tell you, my friend, cooking lamb is an art form, and I'"'"'m more than happy to share with you not two, but three of my favorite techniques to coax out the rich, unctuous flavors and tender textures of this majestic protein. First, we have the classic \\"Sous Vide\\" method. Next, we have the ancient art of \\"Sous le Sable\\". And finally, we have the more modern technique of \\"Hot Smoking.\\""
        },
        {
          "role": "user",
          "content": "Tell me more about the second method."
        }
      ]
    }\'''',
    '''curl "https://api.deepinfra.com/v1/openai/chat/completions" \\
  -H "Content-Type: application/json" \\
  -H "Authorization: Bearer $DEEPINFRA_TOKEN" \\
  -d '{
      "model": "meta-llama/Llama-2-7b-chat-hf",
      "stream": true,
      "messages": [
        {
          "role": "user",
          "content": "Hello!"
        }
      ]
    }\'''',
]


def check_completion_shape(body: dict) -> None:
    assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert set(u) == {"prompt_tokens", "completion_tokens", "total_tokens", "estimated_cost", "prompt_tokens_details"}
    assert set(u["prompt_tokens_details"]) == {"cached_tokens"} and 0 <= u["prompt_tokens_details"]["cached_tokens"] < u["prompt_tokens"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["estimated_cost"] > 0


def check_stream_shape(raw: bytes) -> None:
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("index", range(len(SEED_CURLS)))
def test_seed_page_curl_commands_verbatim(live, index):
    command = SEED_CURLS[index].replace("https://api.deepinfra.com", live.url)
    run = subprocess.run(["bash", "-c", command + " --silent --show-error"], capture_output=True, timeout=60,
                         env={**os.environ, "DEEPINFRA_TOKEN": "anything"})
    assert run.returncode == 0, run.stderr
    if '"stream": true' in command:
        check_stream_shape(run.stdout)
    else:
        check_completion_shape(json.loads(run.stdout))
    wait_idle(live.engine)


# ------------------------------------------------------------------------------------ lifecycle


class SubmitSpy:
    """Records the handles the engine gives out, to check their fate after a disconnect."""

    def __init__(self, engine, monkeypatch):
        self.handles = []
        real = engine.submit
        monkeypatch.setattr(engine, "submit", lambda *a, **k: self.handles.append(real(*a, **k)) or self.handles[-1])

    def wait_handle(self, timeout: float = 10.0):
        deadline = time.time() + timeout
        while not self.handles:
            assert time.time() < deadline, "the request never reached the engine"
            time.sleep(0.005)
        return self.handles[-1]


LONG = {"model": MODEL, "messages": HELLO, "max_tokens": 200, "seed": 5, "temperature": 1.0}


def test_disconnect_mid_stream_frees_the_slot(live, monkeypatch):
    probe = httpx.post(live.url + "/v1/chat/completions", json=LONG, timeout=60).json()
    assert probe["choices"][0]["finish_reason"] == "length", "this seed must not hit EOS for the test to mean anything"
    spy = SubmitSpy(live.engine, monkeypatch)
    with httpx.Client(timeout=60) as http, http.stream("POST", live.url + "/v1/chat/completions",
                                                       json={**LONG, "stream": True}) as r:
        for line in r.iter_lines():  # leave as soon as a real token arrives: the request is generating
            if line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                break
    handle = spy.wait_handle()
    wait_idle(live.engine)
    assert handle.cancelled.is_set() and handle.unfinished == 1, "cancelled before it could finish by itself"


def test_disconnect_while_waiting_for_a_plain_reply_frees_the_slot(live, monkeypatch):
    real = live.engine.tokenizer.decode

    def slow(ids):  # 2 ms a token: 200 tokens outlast the client's 0.15 s on any box
        time.sleep(0.002)
        return real(ids)

    monkeypatch.setattr(live.engine.tokenizer, "decode", slow)
    spy = SubmitSpy(live.engine, monkeypatch)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json=LONG, timeout=httpx.Timeout(10, read=0.15))
    handle = spy.wait_handle()
    wait_idle(live.engine)
    assert handle.cancelled.is_set() and handle.unfinished == 1


def test_engine_failure_after_headers_is_an_error_event(live, client, monkeypatch):
    """Fault injection into the real engine: detokenizing greedy token 3 raises, so the request fails
    after its 200 headers went out."""
    greedy = dict(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    tokenizer = live.engine.tokenizer
    prompt = apply_chat_template(tokenizer, HELLO)
    reference = live.engine.generate([prompt], max_tokens=8, sampling=SamplingOptions(temperature=0))[0]
    bad = reference.choices[0].tokens[3].token_id
    tokenizer.piece_texts.clear()  # the detokenizer's memo of piece texts: decode the bad id afresh
    real = tokenizer.decode

    def faulty(ids):
        if bad in list(ids):
            raise RuntimeError("injected fault")
        return real(ids)

    monkeypatch.setattr(tokenizer, "decode", faulty)
    r = httpx.post(live.url + "/v1/chat/completions", json={**greedy, "stream": True}, timeout=60)
    assert r.status_code == 200
    events = sse_events(r.content)
    assert events[-1] != b"[DONE]"
    err = json.loads(events[-1])["error"]
    assert err["code"] == "engine_error" and "injected fault" in err["message"]
    with pytest.raises(openai.APIError, match="injected fault"):
        list(client.chat.completions.create(stream=True, **greedy))
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(**greedy)
    assert e.value.code == "engine_error"
    monkeypatch.undo()
    wait_idle(live.engine)
    assert client.chat.completions.create(**greedy).choices[0].finish_reason == "length"


# ------------------------------------------------------------------------------------ auth, limits


def test_api_keys(strict):
    with pytest.raises(openai.AuthenticationError) as e:
        strict.client(key="wrong").chat.completions.create(model=MODEL, messages=HELLO)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.post(strict.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    r = httpx.get(strict.url + "/v1/models", headers={"Authorization": "Basic key-one"})
    assert r.status_code == 401
    for key in KEYS:
        assert [m.id for m in strict.client(key=key).models.list()] == [MODEL]
    assert httpx.get(strict.url + "/health").status_code == 200  # health and metrics need no key


def test_full_queue_is_429_with_retry_after(strict):
    with pytest.raises(openai.RateLimitError) as e:
        strict.client(key=KEYS[1]).chat.completions.create(model=MODEL, messages=HELLO)
    assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded"
    assert e.value.response.headers["retry-after"] == "3"


def test_body_size_limit_is_413(strict):
    headers = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"}
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    r = httpx.post(strict.url + "/v1/chat/completions", content=big, headers=headers)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    chunked = httpx.post(strict.url + "/v1/chat/completions", content=iter([big[:3000], big[3000:]]), headers=headers)
    assert chunked.status_code == 413 and error_of(chunked)["code"] == "request_too_large"


def test_warming_up_is_503(strict):
    strict.engine.ready = False
    try:
        r = httpx.get(strict.url + "/ready")
        assert r.status_code == 503 and r.json() == {"status": "warming up"}
        assert httpx.get(strict.url + "/health").status_code == 200  # alive: liveness is not readiness
        with pytest.raises(openai.APIStatusError) as e:
            strict.client(key=KEYS[0]).chat.completions.create(model=MODEL, messages=HELLO)
        assert e.value.status_code == 503 and e.value.code == "model_not_ready"
    finally:
        strict.engine.ready = True
    assert httpx.get(strict.url + "/health").json() == {"status": "ok"}


# ------------------------------------------------------------------------------------ other routes


def test_models_health_schema_metrics(live, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert live.client("/v1/openai").models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    schema = httpx.get(live.url + "/schema/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/openai/chat/completions", "/v1/models", "/health"} <= set(schema["paths"])
    props = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"temperature", "top_p", "min_p", "top_k", "max_tokens", "stop", "n", "presence_penalty", "frequency_penalty",
            "tools", "tool_choice", "response_format", "repetition_penalty", "user", "seed"} <= set(props)
    r = httpx.get(live.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    label = f'model_name="{MODEL}"'
    for name in (f'llama_jax_requests_total{{{label},path="/v1/chat/completions",status="200"}}',
                 f'llama_jax_requests_total{{{label},path="/v1/chat/completions",status="400"}}',
                 "llama_jax_prompt_tokens_total", "llama_jax_completion_tokens_total",
                 "llama_jax_time_to_first_token_seconds_count", "llama_jax_inter_token_latency_seconds_count",
                 f"llama_jax_queue_depth{{{label}}} 0.0", f"llama_jax_busy_slots{{{label}}} 0.0"):
        assert name in text, name
    ttft = next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("llama_jax_time_to_first_token_seconds_count"))
    assert ttft > 0
