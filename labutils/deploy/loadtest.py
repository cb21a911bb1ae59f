"""``python -m labutils loadtest``: concurrent clients against the lab's server on this machine, bounded in
requests and time; latency quantiles, tokens/s, errors, which model answered and the server's memory from its
``/metrics`` (08-Deploy)."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from ..core.errors import BadInput
from .metrics import parse_metrics

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_CLIENTS, MAX_REQUESTS, MAX_TOKENS, MAX_DURATION = 64, 2000, 512, 3600.0
PROMPTS = ("The history of the city begins", "In mathematics, a prime number is", "The river flows through",
           "During the nineteenth century, the", "A computer program is", "The first recorded use of the word")
RSS = "process_resident_memory_bytes"


@dataclass
class LoadTestResult:
    """What ``load_test`` measured. Latencies in seconds per request (the client's view, queueing included);
    ``memory`` the server's resident bytes sampled from ``/metrics`` during the run."""

    clients: int
    requests: int
    answered: int
    errors: int
    not_sent: int
    wall_s: float
    latencies: list[float] = field(repr=False)
    completion_tokens: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    memory: list[float] = field(default_factory=list, repr=False)
    first_error: str | None = None

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.latencies, q)) if self.latencies else float("nan")

    def summary(self) -> dict:
        rss = self.memory or [float("nan")]
        return {"clients": self.clients, "requests": self.requests, "answered": self.answered,
                "errors": self.errors, "not sent": self.not_sent, "p50 s": self.quantile(0.5),
                "p95 s": self.quantile(0.95), "tokens/s": self.completion_tokens / self.wall_s if self.wall_s else 0.0,
                "requests/s": self.answered / self.wall_s if self.wall_s else 0.0,
                "server MiB at start": rss[0] / 2**20, "server MiB peak": max(rss) / 2**20,
                "server MiB at end": rss[-1] / 2**20,
                "answered by": ", ".join(f"{k} {v}" for k, v in sorted(self.by_model.items())) or "-"}

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([self.summary()])

    def to_json(self) -> dict:
        return asdict(self) | {"summary": self.summary()}


def check_url(url: str) -> str:
    """``url`` without a trailing slash if it is http:// on this machine; BadInput otherwise (the load test only
    ever loads a server on loopback)."""
    parsed = urllib.parse.urlparse(str(url))
    if parsed.scheme != "http" or parsed.hostname not in LOOPBACK or parsed.port is None:
        raise BadInput(f"URL {url!r}: allowed only http://127.0.0.1:PORT or http://localhost:PORT (the load test "
                       "runs against a server on this machine)")
    return str(url).rstrip("/")


def check_bound(name: str, value, largest: float, integer: bool = True) -> None:
    """BadInput unless ``value`` is an integer (or, with ``integer=False``, a number of seconds) in (0, largest]."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value <= largest:
        what = "an integer from 1" if integer else "a number of seconds above 0"
        raise BadInput(f"{name} must be {what} up to {largest:g}; got {value!r}")


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def server_health(url: str) -> dict:
    """The server's ``/health`` page: each model's role, check, sparsity and file (a 503 page too)."""
    try:
        with urllib.request.urlopen(f"{check_url(url)}/health", timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def server_metrics(url: str) -> dict[str, float]:
    """The server's ``/metrics`` page as {``name{labels}``: value}."""
    with urllib.request.urlopen(f"{check_url(url)}/metrics", timeout=10) as response:
        return parse_metrics(response.read().decode())


def server_rss(url: str) -> float | None:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            return parse_metrics(response.read().decode()).get(RSS)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def load_test(url: str, *, clients: int = 8, requests: int = 32, max_tokens: int = 32, timeout: float = 120.0,
              duration: float = 600.0) -> LoadTestResult:
    """``requests`` greedy completions of ``max_tokens`` tokens from ``clients`` concurrent clients. Stops sending
    after ``duration`` seconds (what is left counts as not sent); each request may take ``timeout`` seconds."""
    url = check_url(url)
    check_bound("--clients", clients, MAX_CLIENTS)
    check_bound("--requests", requests, MAX_REQUESTS)
    check_bound("--max-tokens", max_tokens, MAX_TOKENS)
    check_bound("--timeout", timeout, MAX_DURATION, integer=False)
    check_bound("--duration", duration, MAX_DURATION, integer=False)
    if server_rss(url) is None:
        raise BadInput(f"URL {url!r}: no lab server answers /metrics there (start one with python -m labutils "
                       "serve MODEL)")
    result = LoadTestResult(clients, requests, 0, 0, 0, 0.0, [])
    lock, done = threading.Lock(), threading.Event()
    start = time.perf_counter()

    def one(i: int) -> None:
        if time.perf_counter() - start > duration:
            with lock:
                result.not_sent += 1
            return
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.0}
        t0 = time.perf_counter()
        try:
            answer = _post(url, body, timeout)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            with lock:
                result.errors += 1
                result.first_error = result.first_error or str(exc)
            return
        with lock:
            result.answered += 1
            result.latencies.append(time.perf_counter() - t0)
            result.completion_tokens += answer.get("usage", {}).get("completion_tokens", 0)
            result.by_model[answer.get("model", "?")] = result.by_model.get(answer.get("model", "?"), 0) + 1

    def sample_memory() -> None:
        while not done.wait(0.25):
            rss = server_rss(url)
            if rss is not None:
                result.memory.append(rss)

    result.memory.append(server_rss(url))
    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(one, range(requests)))
    finally:
        result.wall_s = time.perf_counter() - start
        done.set()
        sampler.join()
    end = server_rss(url)
    if end is not None:
        result.memory.append(end)
    return result
