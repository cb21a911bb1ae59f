"""What the lab's server reports at ``/metrics`` (Prometheus' text format, through ``prometheus_client``):
requests and errors per model, fallbacks, latency quantiles, tokens per second, which model answered, each model's
measured sparsity and health, and the server's memory (08-Deploy)."""
from __future__ import annotations

import resource
import threading
import time
from collections import deque

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()  # no *_created series beside every counter: /metrics stays readable
RECENT = 1000  # latency quantiles and tokens/s cover the last RECENT requests
QUANTILES = (0.5, 0.95, 0.99)


class ServerMetrics:
    """Counters of one server process. ``answered`` and ``failed`` are called by the model proxy, ``observe`` by the
    HTTP middleware (the latency a client sees, queueing included); ``text()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds
        self.requests = Counter("lab_requests", "completion requests answered, by model", ["model"],
                                registry=self.registry)
        self.errors = Counter("lab_model_errors", "completions a model failed (error or non-finite logits)",
                              ["model"], registry=self.registry)
        self.fallbacks = Counter("lab_fallbacks", "requests answered by the fallback model", registry=self.registry)
        self.unanswered = Counter("lab_unanswered", "requests no model could answer (HTTP 503)",
                                  registry=self.registry)
        self.completion_tokens = Counter("lab_completion_tokens", "tokens generated, by model", ["model"],
                                         registry=self.registry)
        self.sparsity = Gauge("lab_model_sparsity", "share of zeros in the model's decoder linears, measured in the "
                              "served file", ["model", "role"], registry=self.registry)
        self.healthy = Gauge("lab_model_healthy", "1 when the model passed its start-up check", ["model", "role"],
                             registry=self.registry)
        self.health_perplexity = Gauge("lab_model_health_perplexity", "perplexity of the start-up check's text",
                                       ["model", "role"], registry=self.registry)
        self.registry.register(_Recent(self))
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=RECENT)
        self._generation: deque[tuple[int, float]] = deque(maxlen=RECENT)  # (tokens, seconds) per completion

    def model(self, name: str, role: str, sparsity: float, healthy: bool, perplexity: float) -> None:
        self.sparsity.labels(name, role).set(sparsity)
        self.healthy.labels(name, role).set(int(healthy))
        self.health_perplexity.labels(name, role).set(perplexity)

    def answered(self, name: str, tokens: int, seconds: float, fallback: bool) -> None:
        self.requests.labels(name).inc()
        self.completion_tokens.labels(name).inc(tokens)
        if fallback:
            self.fallbacks.inc()
        with self._lock:
            self._generation.append((tokens, seconds))

    def failed(self, name: str) -> None:
        self.errors.labels(name).inc()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)

    def recent(self) -> tuple[list[float], float | None]:
        """(the recent request latencies, generated tokens per second of generation time over recent completions)."""
        with self._lock:
            latencies, generation = list(self._latencies), list(self._generation)
        seconds = sum(s for _, s in generation)
        return latencies, (sum(t for t, _ in generation) / seconds if seconds > 0 else None)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _Recent:
    """A collector computed at scrape time: latency quantiles, tokens/s and the peak resident memory."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self):
        latencies, tokens_per_s = self.metrics.recent()
        quantiles = GaugeMetricFamily("lab_request_latency_seconds", f"request latency over the last {RECENT} "
                                      "requests (queueing included)", labels=["quantile"])
        for q in QUANTILES:
            if latencies:
                quantiles.add_metric([str(q)], float(np.quantile(latencies, q)))
        yield quantiles
        speed = GaugeMetricFamily("lab_tokens_per_second", f"tokens generated per second of generation over the last "
                                  f"{RECENT} completions")
        if tokens_per_s is not None:
            speed.add_metric([], tokens_per_s)
        yield speed
        yield GaugeMetricFamily("lab_peak_resident_memory_bytes", "the server process' peak resident memory",
                                value=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        yield GaugeMetricFamily("lab_uptime_seconds", "seconds since the server started",
                                value=time.monotonic() - self.metrics.started)


def parse_metrics(text: str) -> dict[str, float]:
    """{``name{labels}``: value} of a Prometheus text page (comments skipped); what ``loadtest`` and the notebook
    read."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
