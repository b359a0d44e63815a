"""API parity with the servers people script against (issue 26): served-model aliases, /tokenize and
/detokenize, unknown and unsupported fields, readiness, the router metrics and parallel_tool_calls,
on uvicorn over the real engine (the demo model) with the real `openai` client and raw HTTP; and the
seed page's curl, verbatim, against `llama-jax serve --demo --served-model-name ...` (slow)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import httpx
import openai
import pytest

from api.app import create_app
from api.context import STATE_KEY
from api.settings import ServerSettings
from conftest import REPO_ROOT
from helpers import error_of, wait_idle
from live_server import LiveServer, ServeProcess
from llama_jax import checkpoint, tools
from llama_jax.demo import DEMO_VERSION
from llama_jax.engine import Engine, EngineConfig
from llama_jax.tokenizer import Tokenizer, apply_chat_template

DEMO, LLAMA2, SHORT = "llama-jax-demo", "meta-llama/Llama-2-7b-chat-hf", "demo"
HELLO = [{"role": "user", "content": "Hello!"}]
NO_EOS = {"2": -100}  # the demo's EOS banned: a stream runs until it is closed
SEED_PAGE = REPO_ROOT.parent / "shared" / "seed" / "deepinfra-llama-2-7b-chat-api.txt"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def live(demo_engine):
    app = create_app(demo_engine, ServerSettings(model_name=DEMO, model_aliases=(LLAMA2, SHORT)))
    server = LiveServer(app, demo_engine)
    server.ctx = app.state[STATE_KEY]
    yield server
    server.stop()


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(live.url + path, json=body, timeout=60)


# ------------------------------------------------------------------------------------ aliases


def test_every_name_is_listed_accepted_and_the_first_reported(live):
    client = live.client()
    assert [m.id for m in client.models.list()] == [DEMO, LLAMA2, SHORT]
    for name in (DEMO, LLAMA2, SHORT):
        assert client.models.retrieve(name).id == name
        assert client.chat.completions.create(model=name, messages=HELLO, max_tokens=2).model == DEMO
        assert client.completions.create(model=name, prompt="Hi", max_tokens=2).model == DEMO
        assert client.responses.create(model=name, input="Hi", max_output_tokens=2).model == DEMO
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "model_not_found" and all(f"`{n}`" in e.value.message for n in (DEMO, LLAMA2, SHORT))
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_without_the_alias_the_seed_model_name_is_404(demo_engine):
    server = LiveServer(create_app(demo_engine, ServerSettings(model_name=DEMO)), demo_engine)
    try:
        r = post(server, "/v1/openai/chat/completions", {"model": LLAMA2, "messages": HELLO})
        assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    finally:
        server.stop()


# ------------------------------------------------------------------------------------ tokenize


@pytest.mark.parametrize("text", ["Hello world", "  two spaces\nand a newline\ttab", "ünïcödé 😀 ∑ 東京"])
def test_tokenize_a_prompt_round_trips(live, text):
    tokenizer = live.engine.tokenizer
    bare = post(live, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert bare == {"count": len(bare["tokens"]), "max_model_len": live.engine.max_seq_len,
                    "tokens": tokenizer.encode(text), "token_strs": None}
    full = post(live, "/tokenize", {"model": LLAMA2, "prompt": text, "return_token_strs": True}).json()
    assert full["tokens"] == [tokenizer.bos_id, *bare["tokens"]] == tokenizer.prompt_ids(text)
    assert full["token_strs"] == [tokenizer.id_to_piece(t) for t in full["tokens"]]
    for tokens in (bare["tokens"], full["tokens"]):
        assert post(live, "/detokenize", {"tokens": tokens}).json() == {"prompt": text}
    out = live.client().completions.create(model=DEMO, prompt=text, max_tokens=1)
    assert out.usage.prompt_tokens == full["count"]  # what /v1/completions prefills


def test_tokenize_messages_is_the_chat_prompt_and_round_trips(live):
    """The ids /v1/chat/completions prefills, template markers included; their text tokenizes back to them."""
    tokenizer = live.engine.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    out = post(live, "/tokenize", {"messages": messages, "return_token_strs": True}).json()
    assert out["tokens"] == apply_chat_template(tokenizer, messages) and out["tokens"][0] == tokenizer.bos_id
    assert out["token_strs"][0] == tokenizer.id_to_piece(tokenizer.bos_id)
    chat = live.client().chat.completions.create(model=DEMO, messages=messages, max_tokens=1)
    assert chat.usage.prompt_tokens == out["count"]
    text = post(live, "/detokenize", {"tokens": out["tokens"]}).json()["prompt"]
    assert text.startswith("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello!") and text.endswith("[/INST]")
    assert post(live, "/tokenize", {"prompt": text}).json()["tokens"] == out["tokens"]
    with_bos = post(live, "/tokenize", {"messages": messages, "add_special_tokens": True}).json()
    assert with_bos["tokens"] == out["tokens"]  # the template's BOS is not doubled


def test_add_generation_prompt_on_a_jinja_template(demo_checkpoint_dir, demo_engine):
    tokenizer = Tokenizer(checkpoint.load(demo_checkpoint_dir).tokenizer_path, chat_template=CHATML)
    engine = Engine(demo_engine.model, tokenizer, EngineConfig(max_slots=1, max_seq_len=128))
    server = LiveServer(create_app(engine, ServerSettings(model_name=DEMO)), engine)
    try:
        opened = post(server, "/tokenize", {"messages": HELLO}).json()["tokens"]
        closed = post(server, "/tokenize", {"messages": HELLO, "add_generation_prompt": False}).json()["tokens"]
        assert opened[:len(closed)] == closed and len(opened) > len(closed)
        assert post(server, "/detokenize", {"tokens": closed}).json()["prompt"] == "<|im_start|>user\nHello!<|im_end|>\n"
        opening = post(server, "/detokenize", {"tokens": opened}).json()["prompt"][-len("<|im_start|>assistant\n"):]
        assert opening == "<|im_start|>assistant\n"
    finally:
        server.stop()


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/tokenize", {}, 400, "prompt", "missing_required_parameter"),
    ("/tokenize", {"prompt": "a", "messages": HELLO}, 400, "messages", "invalid_value"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, 400, "add_generation_prompt", "invalid_value"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "invalid_type"),
    ("/tokenize", {"prompt": "a", "foo": 1}, 400, "foo", "unknown_parameter"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", "invalid_value"),
    ("/tokenize", {"messages": []}, 400, "messages", "invalid_value"),
    ("/detokenize", {}, 400, "tokens", "missing_required_parameter"),
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens[1]", "invalid_value"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]", "invalid_value"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens[0]", "invalid_type"),
    ("/detokenize", {"tokens": [1], "model": "gpt-4o"}, 404, "model", "model_not_found"),
])
def test_bad_tokenize_requests_name_the_field(live, path, body, status, param, code):
    r = post(live, path, body)
    error = error_of(r)
    assert (r.status_code, error["param"], error["code"]) == (status, param, code), error


# ------------------------------------------------------------------------------------ fields

ROUTES = {"chat": ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 2}),
          "completions": ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
          "responses": ("/v1/responses", {"input": "Hi", "max_output_tokens": 2})}


@pytest.mark.parametrize("route, fields, param, code, fragment", [
    ("chat", {"foo_bar": 1}, "foo_bar", "unknown_parameter", "Unrecognized request argument supplied: foo_bar"),
    ("chat", {"foo": 1, "bar": 2}, "foo", "unknown_parameter", "Unrecognized request arguments supplied: foo, bar"),
    ("chat", {"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter", "not supported"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter", "not supported"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction", "unsupported_parameter", ""),
    ("chat", {"web_search_options": {}}, "web_search_options", "unsupported_parameter", ""),
    ("chat", {"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter", "no audio"),
    ("chat", {"store": True}, "store", "unsupported_parameter", "stateless"),
    ("chat", {"metadata": {"k": 1}}, "metadata", "invalid_value", "string"),
    ("completions", {"foo_bar": 1}, "foo_bar", "unknown_parameter", "Unrecognized request argument"),
    ("completions", {"metadata": {"a": "b"}}, "metadata", "unknown_parameter", "Unrecognized"),
    ("responses", {"foo_bar": 1}, "foo_bar", "unknown_parameter", "Unrecognized request argument"),
    ("responses", {"reasoning": {"effort": "low"}}, "reasoning", "unsupported_parameter", "not supported"),
    ("responses", {"conversation": "conv_1"}, "conversation", "unsupported_parameter", "not supported"),
    ("responses", {"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter", "stateless"),
    ("responses", {"store": True}, "store", "unsupported_parameter", "stores nothing"),
    ("responses", {"background": True}, "background", "unsupported_parameter", "Background"),
    ("responses", {"include": ["message.output_text.logprobs"]}, "include", "unsupported_parameter", ""),
    ("responses", {"truncation": "auto"}, "truncation", "unsupported_parameter", ""),
    ("responses", {"top_logprobs": 2}, "top_logprobs", "unsupported_parameter", ""),
])
def test_unknown_and_unsupported_fields_are_400_naming_them(live, route, fields, param, code, fragment):
    path, body = ROUTES[route]
    r = post(live, path, {"model": DEMO, **body, **fields})
    error = error_of(r)
    assert r.status_code == 400 and (error["param"], error["code"]) == (param, code) and fragment in error["message"]


@pytest.mark.parametrize("route, fields", [
    ("chat", {"user": "u-1", "metadata": {"run": "7"}, "store": False, "service_tier": "auto",
              "safety_identifier": "s-1", "prompt_cache_key": "k", "modalities": ["text"]}),
    ("chat", {"min_tokens": 1, "ignore_eos": False, "stop_token_ids": [2]}),  # vLLM's sampling extensions
    ("chat", {"messages": [{"role": "developer", "content": "Be brief."}, *HELLO]}),
    ("completions", {"user": "u-1", "min_tokens": 1, "ignore_eos": False, "stop_token_ids": [2]}),
    ("responses", {"user": "u-1", "metadata": {"run": "7"}, "store": False, "service_tier": "auto",
                   "safety_identifier": "s-1", "prompt_cache_key": "k", "background": False, "include": [],
                   "truncation": "disabled", "top_logprobs": 0}),
])
def test_harmless_and_extension_fields_are_accepted(live, route, fields):
    path, body = ROUTES[route]
    r = post(live, path, {"model": DEMO, **body, **fields})
    assert r.status_code == 200, r.text
    if route == "responses":
        assert r.json()["metadata"] == {"run": "7"} and r.json()["user"] == "u-1"


def test_the_openai_client_gets_the_refusals(live):
    client = live.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=DEMO, messages=HELLO, reasoning_effort="low")
    assert e.value.param == "reasoning_effort"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=DEMO, input="Hi", previous_response_id="resp_123")
    assert e.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: guided_whatever"):
        client.chat.completions.create(model=DEMO, messages=HELLO, extra_body={"guided_whatever": 1})


# ------------------------------------------------------------------------------------ tools


def test_parallel_tool_calls_false_is_at_most_one_call(live):
    """By construction: with parallel_tool_calls false the envelope grammar holds exactly one call."""
    assert ", call" not in tools.tools_lark([tools.ToolSpec("f"), tools.ToolSpec("g")], "required", parallel=False)
    client = live.client()
    for seed in range(6):
        out = client.chat.completions.create(model=DEMO, messages=HELLO, tools=[WEATHER, CLOCK], max_tokens=80,
                                             tool_choice="required", parallel_tool_calls=False, seed=seed)
        assert out.choices[0].finish_reason == "tool_calls" and len(out.choices[0].message.tool_calls) == 1
        r = client.responses.create(model=DEMO, input="Weather?", max_output_tokens=80, tool_choice="required",
                                    tools=[{"type": "function", **t["function"]} for t in (WEATHER, CLOCK)],
                                    parallel_tool_calls=False, temperature=1.0)
        assert [o.type for o in r.output] == ["function_call"] and r.parallel_tool_calls is False


# ------------------------------------------------------------------------------------ readiness, metrics


def status(live, path: str) -> tuple[int, dict]:
    r = httpx.get(live.url + path)
    return r.status_code, r.json()


def test_ready_and_health_transitions(live, monkeypatch):
    engine, ctx = live.engine, live.ctx
    assert status(live, "/ready") == status(live, "/health") == (200, {"status": "ok"})
    monkeypatch.setattr(engine, "ready", False)
    assert status(live, "/ready") == (503, {"status": "warming up"})
    assert status(live, "/health") == (200, {"status": "warming up"})  # alive: a liveness probe must not kill it
    monkeypatch.undo()
    monkeypatch.setattr(ctx, "draining", True)
    assert status(live, "/ready") == (503, {"status": "shutting down"})
    assert status(live, "/health") == (200, {"status": "shutting down"})
    monkeypatch.undo()
    monkeypatch.setattr(engine, "error", "engine recovery failed: device lost")
    assert status(live, "/ready") == status(live, "/health") == (503, {"status": "failed"})
    monkeypatch.undo()
    assert status(live, "/ready") == (200, {"status": "ok"})


def metrics(live) -> dict[str, float]:
    """Every sample of /metrics by its full name with labels; each llama_jax sample's labels start
    with model_name (asserted)."""
    samples = {}
    for line in httpx.get(live.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.startswith("llama_jax_") and f'model_name="{DEMO}"' in name, line
            samples[name] = float(value)
    return samples


def streaming(live, n: int, stop: threading.Event, ended: threading.Event) -> None:
    """A stream of `n` choices to the end of the context, unless `stop` is set first (leaving cancels
    the request); `ended` is set once it ran to its end."""
    body = {"model": DEMO, "messages": HELLO, "n": n, "stream": True, "logit_bias": NO_EOS}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for _ in r.iter_lines():
            if stop.is_set():
                return
    ended.set()


def wait_for(live, name: str, value: float) -> dict[str, float]:
    """Scrape /metrics until the sample `name` reaches `value` (30 s at most); that scrape."""
    deadline = time.time() + 30
    while (now := metrics(live))[name] < value:
        assert time.time() < deadline, (name, now[name], value)
        time.sleep(0.01)
    return now


def test_router_metrics_with_the_model_name_label(live):
    label = f'{{model_name="{DEMO}"}}'
    text = httpx.get(live.url + "/metrics").text
    for name, kind in (("num_requests_running", "gauge"), ("num_requests_waiting", "gauge"),
                       ("kv_cache_usage_perc", "gauge"), ("time_to_first_token_seconds", "histogram"),
                       ("e2e_request_latency_seconds", "histogram"), ("prompt_tokens_total", "counter"),
                       ("completion_tokens_total", "counter")):
        assert f"# TYPE llama_jax_{name} {kind}" in text, name
    stop, threads, ended = threading.Event(), [], []
    try:  # 8 slots taken by 4 requests, the fifth waits; a stream's first line (its role) comes before its
        for i, n in enumerate((2, 2, 2, 2, 1)):  # admission, so each step waits for the gauges themselves
            ended.append(threading.Event())
            threads.append(threading.Thread(target=streaming, args=(live, n, stop, ended[-1]), daemon=True))
            threads[-1].start()
            busy = wait_for(live, f"llama_jax_busy_slots{label}" if n == 2 else f"llama_jax_num_requests_waiting{label}",
                            2 * (i + 1) if n == 2 else 1)  # one scrape: the gauges of one moment
        assert not any(e.is_set() for e in ended)  # each stream runs to the end of the context (about 500 tokens)
        assert busy[f"llama_jax_num_requests_running{label}"] == 4  # requests, not slots
        assert busy[f"llama_jax_kv_cache_usage_perc{label}"] == 1.0  # 8 busy slots of 8
        assert busy[f"llama_jax_busy_slots{label}"] == 8
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    wait_idle(live.engine)
    idle = metrics(live)
    assert idle[f"llama_jax_num_requests_running{label}"] == idle[f"llama_jax_num_requests_waiting{label}"] == 0
    assert idle[f"llama_jax_kv_cache_usage_perc{label}"] == 0
    assert idle[f"llama_jax_time_to_first_token_seconds_count{label}"] >= 5
    assert idle[f"llama_jax_e2e_request_latency_seconds_count{label}"] >= 5
    assert idle[f"llama_jax_e2e_request_latency_seconds_sum{label}"] > idle[
        f"llama_jax_time_to_first_token_seconds_sum{label}"]
    assert idle[f"llama_jax_prompt_tokens_total{label}"] > 0 and idle[f"llama_jax_completion_tokens_total{label}"] > 0


# ------------------------------------------------------------------------------------ the real command


def seed_curl() -> str:
    """The seed page's first curl, verbatim."""
    if not SEED_PAGE.exists():
        pytest.skip(f"the seed page is not at {SEED_PAGE} (it lives in ../shared)")
    return re.search(r'curl "https://api\.deepinfra\.com/v1/openai/chat/completions".*?\n    }\'', SEED_PAGE.read_text(),
                     re.DOTALL).group(0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_served_model_name_answers_the_seed_curl_verbatim(tmp_path, demo_checkpoint_dir):
    """`llama-jax serve --demo --served-model-name llama-jax-demo meta-llama/Llama-2-7b-chat-hf`: /ready
    is 503 (and /health 200) while it warms up, then 200; the seed's curl gets a 200 reply."""
    command = seed_curl()
    (tmp_path / f"demo-v{DEMO_VERSION}").symlink_to(demo_checkpoint_dir)  # the session's demo, not rebuilt
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code
                seen.append((ready, httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code))
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    server = ServeProcess(tmp_path, "--demo", "--port", str(port), "--max-slots", "2", "--max-seq-len", "256",
                          "--max-prefill-tokens", "128", "--served-model-name", DEMO, LLAMA2)
    try:
        time.sleep(0.5)
        done.set()
        prober.join(10)
        assert (503, 200) in seen and seen[-1] == (200, 200), seen[:3] + seen[-3:]
        assert seen.index((200, 200)) > seen.index((503, 200))  # warming up, then ready: never back
        assert any(f"also answers to '{LLAMA2}'" in line for line in server.lines)
        run = subprocess.run(["bash", "-c", command.replace("https://api.deepinfra.com", server.url)
                              + " --silent --show-error --fail-with-body"], capture_output=True, timeout=120,
                             env={**os.environ, "DEEPINFRA_TOKEN": "anything"})
        assert run.returncode == 0, run.stdout + run.stderr
        reply = json.loads(run.stdout)
        assert reply["object"] == "chat.completion" and reply["model"] == DEMO
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == [DEMO, LLAMA2]
    finally:
        server.stop()
