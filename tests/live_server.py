"""A real uvicorn server in a background thread on a free loopback port, for the API tests."""

from __future__ import annotations

import threading
import time

import openai
import uvicorn


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
