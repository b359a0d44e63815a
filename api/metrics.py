"""Prometheus metrics of one app, in its own registry (two apps in one process never collide)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Request counts by path and status, token counters, latency histograms and engine gauges."""

    # Litestar appends the charset to text/* media types itself
    content_type = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")

    def __init__(self, engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llama_jax_requests", "HTTP requests by path and response status.",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter("llama_jax_prompt_tokens", "Prompt tokens of admitted chat requests.", registry=r)
        self.completion_tokens = Counter("llama_jax_completion_tokens", "Generated tokens, over all choices.",
                                         registry=r)
        self.ttft = Histogram("llama_jax_time_to_first_token_seconds",
                              "From receiving a chat request to its first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llama_jax_inter_token_latency_seconds",
                             "Time between consecutive tokens of one choice.", buckets=_TOKEN_BUCKETS, registry=r)
        Gauge("llama_jax_queue_depth", "Requests waiting for free slots.",
              registry=r).set_function(lambda: engine.queue_depth)
        Gauge("llama_jax_busy_slots", "Decode slots generating right now.",
              registry=r).set_function(lambda: engine.busy_slots)
        Gauge("llama_jax_slots", "Decode slots in total.", registry=r).set_function(lambda: engine.config.max_slots)
        Gauge("llama_jax_ready", "1 once warm-up is done and requests are served.",
              registry=r).set_function(lambda: float(bool(engine.ready)))
        r.register(_PrefixCacheCollector(engine.prefix))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> TokenTimer:
        return TokenTimer(self)


class _PrefixCacheCollector:
    """The engine's prefix-cache counters and occupancy, read at scrape time."""

    def __init__(self, prefix) -> None:
        self._prefix = prefix

    def collect(self):
        p = self._prefix
        yield CounterMetricFamily("llama_jax_prefix_cache_hits", "Prompts (one per choice) that reused a cached prefix.",
                                  value=p.hits)
        yield CounterMetricFamily("llama_jax_prefix_cache_reused_tokens", "Prompt tokens taken from the prefix cache "
                                  "instead of being prefilled.", value=p.reused_tokens)
        yield GaugeMetricFamily("llama_jax_prefix_cache_slots", "Slots holding a reusable prefix.", value=p.cached_slots)
        yield GaugeMetricFamily("llama_jax_prefix_cache_tokens", "Tokens whose keys the slots hold for reuse.",
                                value=p.cached_tokens)


class TokenTimer:
    """Latency bookkeeping of one request: TTFT on its first token, then gaps per choice."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._last: dict[int, float] = {}
        self.completion_tokens = 0

    def tokens(self, choice: int, count: int) -> None:
        """Record `count` tokens of `choice` arriving now (one event)."""
        if count <= 0:
            return
        now = time.perf_counter()
        if not self._last:
            self._metrics.ttft.observe(now - self._start)
        if choice in self._last:
            gap = (now - self._last[choice]) / count
            for _ in range(count):
                self._metrics.itl.observe(gap)
        self._last[choice] = now
        self.completion_tokens += count

    def finish(self, prompt_tokens: int) -> None:
        """Count the request's tokens once it ends (finished, failed or cancelled)."""
        self._metrics.prompt_tokens.inc(prompt_tokens)
        self._metrics.completion_tokens.inc(self.completion_tokens)
