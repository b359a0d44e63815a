"""The serve command's drain (api/shutdown.py), in process on a real server and engine (the demo
model): new requests get 503 at once, accepted ones finish within the drain timeout. The signals and
the cut at the timeout are tested on a real `llama-jax serve` process in test_serve.py (slow tier)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from api.app import create_app
from api.context import STATE_KEY
from api.settings import ServerSettings
from api.shutdown import drain, live
from live_server import LiveServer

MODEL = "llama-jax-demo"


@pytest.fixture
def served(demo_checkpoint_dir):
    """A server on a fresh demo-model engine of its own (the drain stops it; it compiles only the
    programs one short request runs); yields (server, ServerContext)."""
    from llama_jax import checkpoint
    from llama_jax.engine import Engine, EngineConfig
    from llama_jax.tokenizer import Tokenizer

    loaded = checkpoint.load(demo_checkpoint_dir)
    config = EngineConfig(max_slots=8, max_seq_len=512, min_prefill_bucket=32, max_prefill_tokens=128)
    engine = Engine(loaded.model, Tokenizer(loaded.tokenizer_path), config).start(warmup=False)
    app = create_app(engine, ServerSettings(model_name=MODEL))
    server = LiveServer(app, engine)
    yield server, app.state[STATE_KEY]
    server.stop()
    engine.stop()


class Stream:
    """A streamed chat request read in a background thread: its SSE data lines, and an event set
    once the first content token arrived (so the request is accepted and generating)."""

    def __init__(self, url: str, ctx, max_tokens: int):
        ban_eos = {str(i): -100 for i in ctx.engine.tokenizer.eos_ids}  # it runs to max_tokens
        self.body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "stream": True,
                     "max_tokens": max_tokens, "logit_bias": ban_eos}
        self.data: list[str] = []
        self.generating = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self.thread.start()
        assert self.generating.wait(120), self.data

    def _read(self, url: str) -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", json=self.body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.data.append(line[len("data: "):])
                    if '"content":"' in line and '"content":""' not in line:
                        self.generating.set()
        self.generating.set()

    def events(self) -> list[dict | str]:
        self.thread.join(60)
        assert not self.thread.is_alive()
        return [d if d == "[DONE]" else json.loads(d) for d in self.data]


def test_the_drain_refuses_new_requests_and_waits_for_the_accepted_ones(served):
    """The cut at the drain timeout (an error event, then [DONE]) is tested on `llama-jax serve`
    (test_serve.py), which needs the same second engine this test would."""
    server, ctx = served
    stream = Stream(server.url, ctx, max_tokens=64)
    assert live(ctx.handles) == 1
    drained: list[tuple[int, int, float]] = []
    drainer = threading.Thread(target=lambda: drained.append(drain(ctx, timeout_s=120)))
    drainer.start()
    late = httpx.post(server.url + "/v1/chat/completions", json={**stream.body, "stream": False}, timeout=30)
    assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down"
    assert late.headers["Retry-After"]
    drainer.join(150)
    running, cut, waited = drained[0]
    assert (running, cut) == (1, 0) and waited < 120
    events = stream.events()
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "length"
    assert live(ctx.handles) == 0 and not ctx.engine.ready  # the drain stopped the engine
