"""Real servers for the API tests: uvicorn in a background thread on a free loopback port, and
`llama-jax serve` as a subprocess (this checkout's code) as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import uvicorn
from conftest import FAST_COMPILE_FLAGS

REPO_ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(cache: Path, random_weights: bool) -> dict[str, str]:
    """The environment of a `llama-jax` subprocess: this worktree first on the path, `cache` as its cache folder,
    one CPU device. A random-weight model compiles fast (tests/conftest.py's flags); the real model as shipped."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"XLA_FLAGS": FAST_COMPILE_FLAGS} if random_weights else {}
    return env | {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                  "LLAMA_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}


class LiveServer:
    """Serves `app` on 127.0.0.1 until `stop()`; `engine` is kept for tests that inspect it."""

    def __init__(self, app, engine=None):
        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, prefix: str = "/v1", key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + prefix, api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class ServeProcess:
    """`llama-jax serve ARGS` on a free loopback port with its own cache folder; stderr collected,
    the URL read from the ready line."""

    def __init__(self, cache: Path, *args: str, timeout: float = 900):
        env = subprocess_env(cache, random_weights="--demo" in args)
        self.proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--port", "0", *args], env=env,
                                     cwd="/", text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(line.rstrip() for line in self.proc.stderr),
                         daemon=True).start()
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        deadline = time.time() + timeout
        while not (ready := [line for line in self.lines if " ready in " in line]):
            assert self.proc.poll() is None and time.time() < deadline, "\n".join(self.lines[-30:])
            time.sleep(0.2)
        self.url = re.search(r"at (http://\S+)/v1 ", ready[0]).group(1)

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=300)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
