"""Prometheus metrics of one app, in its own registry (two apps in one process never collide).

Every series carries a `model_name` label (the reported name), so one scrape config serves many
models. The router-facing gauges (running and waiting requests, KV-cache usage 0..1) and the
latency histograms follow vLLM's semantics; docs/serving.md maps them to the Gateway API
Inference Extension's model-server protocol.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


def running_requests(engine) -> int:
    """Requests with at least one choice in a decode slot (an engine without `slots`: its busy slots)."""
    slots = getattr(engine, "slots", None)
    if slots is None:
        return engine.busy_slots
    return len({active.handle for active in list(slots) if active is not None})


def kv_cache_usage(engine) -> float:
    """Busy decode slots over all slots, 0..1: each slot reserves a whole context of KV cache, so a
    full house (1.0) means a new request waits, as vLLM's usage reaching 1 does."""
    return engine.busy_slots / max(engine.config.max_slots, 1)


class Metrics:
    """Request counts by path and status, token counters, latency histograms and engine gauges."""

    # Litestar appends the charset to text/* media types itself
    content_type = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")

    def __init__(self, engine, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        label = ["model_name"]

        def gauge(name: str, doc: str, read) -> None:
            Gauge(name, doc, label, registry=r).labels(model_name).set_function(read)

        self.requests = Counter("llama_jax_requests", "HTTP requests by path and response status.",
                                ["model_name", "path", "status"], registry=r)
        self.prompt_tokens = Counter("llama_jax_prompt_tokens", "Prompt tokens of finished requests.", label,
                                     registry=r).labels(model_name)
        self.completion_tokens = Counter("llama_jax_completion_tokens", "Generated tokens, over all choices.", label,
                                         registry=r).labels(model_name)
        self.ttft = Histogram("llama_jax_time_to_first_token_seconds",
                              "From receiving a request to its first generated token.", label,
                              buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("llama_jax_e2e_request_latency_seconds",
                             "From receiving a request to its end (finished, failed or cancelled).", label,
                             buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("llama_jax_inter_token_latency_seconds",
                             "Time between consecutive tokens of one choice.", label, buckets=_TOKEN_BUCKETS,
                             registry=r).labels(model_name)
        gauge("llama_jax_num_requests_running", "Requests with a choice in a decode slot now.",
              lambda: running_requests(engine))
        gauge("llama_jax_num_requests_waiting", "Requests queued for free slots.", lambda: engine.queue_depth)
        gauge("llama_jax_kv_cache_usage_perc", "KV-cache usage, 0..1: busy decode slots over all slots (each "
              "slot holds a whole context).", lambda: kv_cache_usage(engine))
        gauge("llama_jax_queue_depth", "Requests waiting for free slots.", lambda: engine.queue_depth)
        gauge("llama_jax_busy_slots", "Decode slots generating right now.", lambda: engine.busy_slots)
        gauge("llama_jax_slots", "Decode slots in total.", lambda: engine.config.max_slots)
        gauge("llama_jax_ready", "1 once warm-up is done and requests are served.", lambda: float(bool(engine.ready)))
        r.register(_PrefixCacheCollector(engine.prefix, model_name))
        r.register(_SpeculativeCollector(engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> TokenTimer:
        return TokenTimer(self)


class _PrefixCacheCollector:
    """The engine's prefix-cache counters and occupancy, read at scrape time."""

    def __init__(self, prefix, model_name: str) -> None:
        self._prefix, self._labels = prefix, [model_name]

    def collect(self):
        p = self._prefix
        for family, name, doc, value in (
                (CounterMetricFamily, "llama_jax_prefix_cache_hits", "Prompts (one per choice) that reused a cached "
                                                                     "prefix.", p.hits),
                (CounterMetricFamily, "llama_jax_prefix_cache_reused_tokens", "Prompt tokens taken from the prefix "
                                                                              "cache instead of being prefilled.",
                 p.reused_tokens),
                (GaugeMetricFamily, "llama_jax_prefix_cache_slots", "Slots holding a reusable prefix.", p.cached_slots),
                (GaugeMetricFamily, "llama_jax_prefix_cache_tokens", "Tokens whose keys the slots hold for reuse.",
                 p.cached_tokens)):
            metric = family(name, doc, labels=["model_name"])
            metric.add_metric(self._labels, value)
            yield metric


class _SpeculativeCollector:
    """The engine's speculative-decoding totals (vLLM's spec_decode counters) and their ratio (vLLM's
    draft acceptance rate gauge: 0 before any draft), read at scrape time."""

    def __init__(self, engine, model_name: str) -> None:
        self._engine, self._labels = engine, [model_name]

    def collect(self):
        drafted, accepted = self._engine.drafted_tokens, self._engine.accepted_tokens
        for family, name, doc, value in (
                (CounterMetricFamily, "llama_jax_spec_decode_num_draft_tokens", "Draft tokens verified.", drafted),
                (CounterMetricFamily, "llama_jax_spec_decode_num_accepted_tokens", "Draft tokens accepted.", accepted),
                (GaugeMetricFamily, "llama_jax_spec_decode_draft_acceptance_rate",
                 "Accepted over verified draft tokens since start.", accepted / drafted if drafted else 0.0)):
            metric = family(name, doc, labels=["model_name"])
            metric.add_metric(self._labels, value)
            yield metric


class TokenTimer:
    """Latency bookkeeping of one request: TTFT on its first token, then gaps per choice, and its
    end-to-end time when it finishes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._last: dict[int, float] = {}
        self._finished = False
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
        """Count the request's tokens and its end-to-end time once it ends (finished, failed or
        cancelled); later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        self._metrics.e2e.observe(time.perf_counter() - self._start)
        self._metrics.prompt_tokens.inc(prompt_tokens)
        self._metrics.completion_tokens.inc(self.completion_tokens)
