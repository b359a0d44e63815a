"""`llama-jax serve` as a user runs it: a real subprocess (this worktree's code, on the built-in demo
model, `--demo`) on a loopback port. Start-up failures exit 1 with one line; structured output works
on the demo; SIGTERM drains 16 streams (last: it ends the server). The README's quick start (the
real default model) is tests/test_real_model.py's."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from live_server import REPO_ROOT, subprocess_env

pytestmark = pytest.mark.slow  # real `llama-jax serve` subprocesses, each warming up

SEED_PAGE = REPO_ROOT.parent / "shared" / "seed" / "deepinfra-llama-2-7b-chat-api.txt"
DEMO = "llama-jax-demo"
HELLO = [{"role": "user", "content": "Hello!"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NO_EOS = {"2": -100}  # the demo's end of turn banned: a long stream runs to its length (or the drain's cut)
SMALL = ["--max-slots", "4", "--max-seq-len", "256", "--max-prefill-tokens", "128"]  # a short warm-up


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The subprocess environment, with a private cache (demo + XLA): every model served here has random weights."""
    return subprocess_env(tmp_path_factory.mktemp("llama-jax-cache"), random_weights=True)


def serve_command(*args: str) -> list[str]:
    """`serve` on the random demo model unless a checkpoint is given (plain `serve` would fetch the
    real default model: tests/test_real_model.py runs that)."""
    return [sys.executable, "-m", "api.cli", "serve", *args, *(() if "--checkpoint" in args else ("--demo",))]


def test_the_subprocess_runs_this_worktree(env):
    out = subprocess.run([sys.executable, "-c", "import api.cli, llama_jax; print(api.cli.__file__, llama_jax.__file__)"],
                         env=env, capture_output=True, text=True, timeout=60, cwd="/")
    assert all(Path(p).is_relative_to(REPO_ROOT) for p in out.stdout.split()), out


def run_to_exit(env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(serve_command(*args), env=env, capture_output=True, text=True, timeout=timeout, cwd="/")


def assert_one_clear_error(run: subprocess.CompletedProcess, message: str) -> None:
    assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
    errors = [line for line in run.stderr.splitlines() if line.startswith("llama-jax: error:")]
    assert len(errors) == 1 and message in errors[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "terminate called" not in run.stderr


def test_generate_streams_a_reply_with_compile_progress(env, demo_checkpoint_dir):
    """`llama-jax generate` on the demo model: one line per compiled program (several compile at
    once), then the reply streamed to stdout."""
    out = subprocess.run([sys.executable, "-m", "api.cli", "generate", "Hello!", "--checkpoint", str(demo_checkpoint_dir),
                          "--max-tokens", "5", "--max-seq-len", "64"], env=env, capture_output=True, text=True,
                         timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"compiling (\d+)/\1 ", out.stderr), out.stderr[-3000:]
    assert out.stdout.strip(), "the reply is streamed to stdout"


@pytest.mark.parametrize("with_checkpoint", [False, True], ids=["demo", "checkpoint"])
def test_port_in_use_exits_1_with_one_message(env, demo_checkpoint_dir, with_checkpoint):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        extra = ["--checkpoint", str(demo_checkpoint_dir)] if with_checkpoint else []
        run = run_to_exit(env, "--port", str(port), *extra, timeout=60)
    assert_one_clear_error(run, f"cannot listen on 127.0.0.1:{port}: Address already in use")


def test_max_seq_len_above_the_model_is_refused(env):
    run = run_to_exit(env, "--port", "0", "--max-seq-len", "5000")
    assert_one_clear_error(run, "max_seq_len 5000 exceeds the model's context of 4096 tokens")


class Serve:
    """A running `llama-jax serve`; its stderr is collected in a thread, its URL read from the ready line."""

    def __init__(self, env, *args: str):
        self.proc = subprocess.Popen(serve_command("--port", "0", *args), env=env, cwd="/", text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.stdout = ""
        threading.Thread(target=self._collect, daemon=True).start()
        threading.Thread(target=lambda: setattr(self, "stdout", self.proc.stdout.read()), daemon=True).start()
        deadline = time.time() + 600
        while not (ready := [line for line in self.lines if " ready in " in line]):
            assert self.proc.poll() is None and time.time() < deadline, "\n".join(self.lines[-30:])
            time.sleep(0.1)
        self.url = re.search(r"at (http://\S+)/v1 ", ready[0]).group(1)

    def _collect(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def served(env):
    server = Serve(env, *SMALL)
    yield server
    server.stop()


def test_ctrl_c_during_warm_up_exits_cleanly(env, tmp_path):
    """A cache of its own (nothing compiled yet, whatever ran before), so the signal lands mid-warm-up."""
    proc = subprocess.Popen(serve_command("--port", "0", *SMALL), env={**env, "LLAMA_JAX_CACHE": str(tmp_path)},
                            cwd="/", text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "warm-up 1/" in line:
            proc.send_signal(signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-3000:]
    assert "SIGINT: shutting down" in log and " ready in " not in log, log[-3000:]
    assert "Traceback" not in log and "terminate called" not in log, log[-3000:]


def test_structured_output_on_the_demo_model(served):
    client = served.client()
    for seed in range(3):
        out = client.chat.completions.create(model=DEMO, messages=HELLO, response_format={"type": "json_object"},
                                             max_tokens=40, seed=seed)
        assert out.choices[0].finish_reason == "stop" and isinstance(json.loads(out.choices[0].message.content), dict)
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        out = client.chat.completions.create(model=DEMO, messages=HELLO, response_format=fmt, max_tokens=60, seed=seed)
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
        out = client.chat.completions.create(model=DEMO, messages=HELLO, tools=[WEATHER], max_tokens=60, seed=seed,
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}})
        (call,) = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def stream(url: str, max_tokens: int, first: threading.Event, out: dict) -> None:
    """One raw SSE stream; `first` is set once its first event arrived (it was accepted)."""
    body = {"model": DEMO, "messages": HELLO, "stream": True, "max_tokens": max_tokens, "seed": max_tokens,
            "logit_bias": NO_EOS}
    raw = b""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        out["status"] = r.status_code
        for chunk in r.iter_raw():
            raw += chunk
            first.set()
    out["raw"] = raw


@pytest.fixture
def drained(env):
    """A server of its own for the SIGTERM test (the signal ends it, whatever runs after)."""
    server = Serve(env, "--max-slots", "4", "--max-seq-len", "1024", "--max-prefill-tokens", "128", "--drain-timeout", "0.5")
    yield server
    server.stop()


def test_sigterm_drains_16_streams_then_exits_0(drained):
    """4 slots, 16 streams: 8 short ones first (they finish), then 8 long ones and a long plain request
    (cut at the 0.5 s drain timeout). Every stream ends with [DONE]; nothing is cut silently."""
    short, long = [4] * 8, [1000] * 8  # 1000 tokens: never done within the 0.5 s drain, however fast the box
    results = [{} for _ in short + long]
    threads = []
    for max_tokens, out in zip(short + long, results):
        first = threading.Event()
        threads.append(threading.Thread(target=stream, args=(drained.url, max_tokens, first, out)))
        threads[-1].start()
        assert first.wait(30), "a stream got no first event"
    plain: dict = {}

    def plain_request() -> None:
        body = {"model": DEMO, "messages": HELLO, "max_tokens": 1000, "logit_bias": NO_EOS}
        plain["r"] = httpx.post(drained.url + "/v1/chat/completions", json=body, timeout=60)

    threads.append(threading.Thread(target=plain_request))
    threads[-1].start()
    time.sleep(0.05)
    drained.proc.send_signal(signal.SIGTERM)
    # No late request here: the 0.5 s drain may end before it arrives on a slow box (test_serve_reliability's
    # 60 s drains check the refusals and /health while draining).
    for t in threads:
        t.join(60)
    assert drained.proc.wait(60) == 0
    finished, cut = [], []
    for max_tokens, out in zip(short + long, results):
        assert out["status"] == 200 and out["raw"].endswith(b"data: [DONE]\n\n"), out
        events = [json.loads(e[6:]) for e in out["raw"].split(b"\n\n")[:-2]]
        if "error" in events[-1]:
            assert events[-1]["error"]["code"] == "server_shutting_down" and events[-1]["error"]["type"] == "server_error"
            cut.append(max_tokens)
        else:
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            finished.append(max_tokens)
    assert sorted(finished)[:8] == short and cut and set(cut) == {1000}, (finished, cut)
    r = plain["r"]
    assert r.status_code in (200, 503) and r.headers["content-type"] == "application/json"
    if r.status_code == 503:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "server_shutting_down"
    log = "\n".join(drained.lines)
    summary = [line for line in drained.lines if "SIGTERM: shutting down" in line]
    ended = int(re.search(r"(\d+) ended unfinished", summary[0]).group(1)) if len(summary) == 1 else None
    assert ended in (len(cut), len(cut) + 1), log[-3000:]  # + the plain request, if it was accepted before the signal
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def test_serve_quantize_int8_at_load(env, demo_checkpoint_dir):
    """`serve --quantize int8` on a float checkpoint: quantized while loading, then a normal reply."""
    server = Serve(env, "--checkpoint", str(demo_checkpoint_dir), "--quantize", "int8",
                   "--max-slots", "2", "--max-seq-len", "64", "--max-prefill-tokens", "64")
    try:
        assert any("quantizing its matrices to int8" in line for line in server.lines)
        reply = server.client().chat.completions.create(model="meta-llama/Llama-2-7b-chat-hf", messages=HELLO,
                                                        max_tokens=4)
        assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens >= 1
    finally:
        server.stop()
