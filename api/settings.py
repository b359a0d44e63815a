"""Server settings: what the HTTP layer needs besides the engine (model name, keys, prices, limits)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping

DEFAULT_MODEL_NAME = "meta-llama/Llama-2-7b-chat-hf"
API_KEYS_ENV = "LLAMA_JAX_API_KEYS"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Immutable configuration of one server.

    Prices are in dollars per million tokens and only feed `usage.estimated_cost` (0.0 by
    default: a self-hosted model costs what your hardware costs). An empty `api_keys` turns
    authentication off.
    """

    model_name: str = DEFAULT_MODEL_NAME  # the name replies report
    model_aliases: tuple[str, ...] = ()  # further names requests may use (`--served-model-name A B ...`)
    api_keys: tuple[str, ...] = ()
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    max_body_bytes: int = 1 << 20  # a 4096-token chat is ~16 KB of JSON; 1 MiB is generous
    retry_after_s: int = 1  # the Retry-After header of a 429 (queue full)
    body_timeout_s: float = 30.0  # a request body slower than this is a 408 (a slow upload holds a connection)
    metrics_public: bool = False  # serve /metrics without a key (for a scraper), even with api_keys
    playground: bool = True  # serve the chat playground at / (api/playground.py)
    worker_threads: int = 2  # the pool for request CPU work off the event loop (api/offload.py)
    scoring_warmup: bool = True  # `serve` compiles prompt scoring's programs at warm-up (api/cli.py)

    def __post_init__(self) -> None:
        if not self.model_name or not all(self.model_aliases):
            raise ValueError("model names must not be empty")
        if any(not k for k in self.api_keys):
            raise ValueError("API keys must not be empty strings")
        if self.price_input_per_mtok < 0 or self.price_output_per_mtok < 0:
            raise ValueError("prices must be >= 0")
        if self.worker_threads < 1:
            raise ValueError("worker_threads must be >= 1")
        if self.max_body_bytes < 1 or self.retry_after_s < 0 or not self.body_timeout_s > 0:
            raise ValueError("max_body_bytes must be >= 1, retry_after_s >= 0 and body_timeout_s > 0")

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name the server answers to, the reported one first."""
        return tuple(dict.fromkeys((self.model_name, *self.model_aliases)))

    def estimated_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars for one request at the configured per-million-token prices."""
        cost = prompt_tokens * self.price_input_per_mtok / 1e6 + completion_tokens * self.price_output_per_mtok / 1e6
        return round(cost, 12)


def api_keys_from(cli_keys: Iterable[str] | None, environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """Keys from `--api-key` (repeatable) plus the comma-separated LLAMA_JAX_API_KEYS, deduplicated in order."""
    keys = [*(cli_keys or ()), *(k.strip() for k in environ.get(API_KEYS_ENV, "").split(","))]
    return tuple(dict.fromkeys(k for k in keys if k))
