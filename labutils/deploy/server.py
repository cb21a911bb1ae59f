"""``python -m labutils serve``: a pruned model behind llama-cpp-python's OpenAI-compatible server on 127.0.0.1,
with a dense fallback, a start-up health check, ``/health`` and ``/metrics`` (08-Deploy; README "Deployment").

The HTTP side is llama-cpp-python's own (its FastAPI router: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, served by uvicorn); the lab adds the model router (``router.py``), a latency middleware and two
routes. ``serving`` runs the same command as a child process for a notebook or a test and always stops it.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BadInput, LabError
from ..core.loading import embedded_gguf_path
from ..core.manifests import strict_json
from ..core.saved import is_lab_output
from ..core.validation import check_positive_int
from .engine import check_gguf_file, llama_cpp_module
from .metrics import ServerMetrics
from .router import ModelRouter, Served, load_served

HOST = "127.0.0.1"  # the lab's server is for this machine only
DEFAULT = "default"  # --fallback default: the embedded model's own GGUF file (the dense model as distributed)


def check_model(given: str | os.PathLike, what: str) -> None:
    """BadInput in one line unless ``given`` is a GGUF file, ``default`` or a lab output folder (checked before
    anything is loaded)."""
    if str(given) == DEFAULT:
        return
    if Path(given).expanduser().is_dir():
        if not is_lab_output(Path(given).expanduser()):
            raise BadInput(f"{what} {str(given)!r} is a folder but not a lab output; allowed: a .gguf file, "
                           f"'{DEFAULT}' or a folder written by python -m labutils prune")
        return
    check_gguf_file(given, what)


def resolve_model(given: str | os.PathLike, what: str, scratch: Path) -> Path:
    """The GGUF file to serve for ``given``: a .gguf file, ``default`` (the embedded dense model's own file) or a
    lab output folder, exported to f16 GGUF in ``scratch`` (the server's temporary folder, removed when it stops;
    ``load_pruned`` checks every byte of the folder on the way)."""
    check_model(given, what)
    if str(given) == DEFAULT:
        return embedded_gguf_path()
    path = Path(given).expanduser()
    if not path.is_dir():
        return path
    from .gguf import export_gguf

    return export_gguf(path, scratch / f"{what.strip('-').lower()}-{path.resolve().name}.gguf", "f16")


def check_port(port: int) -> int:
    """``port`` if 1024–65535 and free on 127.0.0.1; BadInput otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535:
        raise BadInput(f"--port must be an integer from 1024 to 65535; got {port!r}")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind((HOST, port))
        except OSError:
            raise BadInput(f"--port {port}: already in use on {HOST}; pick another") from None
    return port


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def load_models(model: str | os.PathLike, fallback: str | os.PathLike | None, threads: int | None,
                n_ctx: int, scratch: Path) -> list[Served]:
    """The primary (and fallback) model, checked; LabError when none can serve."""
    paths = [("pruned", "primary", resolve_model(model, "MODEL", scratch))]
    if fallback is not None:
        paths.append(("dense", "fallback", resolve_model(fallback, "--fallback", scratch)))
    models = [load_served(name, role, path, threads, n_ctx) for name, role, path in paths]
    if not any(m.healthy for m in models):
        raise LabError("; ".join(f"{m.name} ({m.path.name}) failed its start-up check: {m.problem}" for m in models)
                       + ("" if fallback else " (--fallback DENSE would serve the dense model instead)"))
    return models


def build_app(models: list[Served], metrics: ServerMetrics):
    """llama-cpp-python's FastAPI app with the lab's router as its model proxy, plus ``/health`` and ``/metrics``."""
    llama_cpp_module()
    from fastapi import FastAPI, HTTPException, Response
    from fastapi.middleware import Middleware
    from llama_cpp.server import app as server_app
    from llama_cpp.server.settings import ServerSettings
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin

    server_app.set_server_settings(ServerSettings(host=HOST))
    app = FastAPI(title="Wanda lab server (llama.cpp)",
                  middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))])
    app.include_router(server_app.router)
    # what its get_llama_proxy dependency hands the routes; no model left to answer is HTTP 503
    app.state.router = ModelRouter(models, metrics, lambda detail: HTTPException(503, detail))
    server_app._llama_proxy = app.state.router

    @app.middleware("http")
    async def timed(request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        if request.url.path.startswith("/v1/") and request.method == "POST":
            metrics.observe(time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health():
        body = {m.name: {"role": m.role, "healthy": m.healthy, "problem": m.problem, "sparsity": m.sparsity,
                         "check_perplexity": m.perplexity, "file": m.path.name} for m in models}
        return Response(strict_json(body), status_code=200 if any(m.healthy for m in models) else 503,
                        media_type="application/json")

    @app.get("/metrics")
    async def metrics_page():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    return app


def serve(model: str | os.PathLike, *, fallback: str | os.PathLike | None = None, port: int = 8080,
          threads: int | None = None, n_ctx: int = 2048) -> None:
    """Serve until Ctrl-C or SIGTERM: check the models, print where, run uvicorn on 127.0.0.1:``port``."""
    check_port(port)
    check_model(model, "MODEL")
    if fallback is not None:
        check_model(fallback, "--fallback")
    for name, value in (("--threads", threads), ("--ctx", n_ctx)):
        if value is not None:
            check_positive_int(name, value)
    llama_cpp_module()
    with tempfile.TemporaryDirectory(prefix="lab-serve-") as scratch:
        _serve(load_models(model, fallback, threads, n_ctx, Path(scratch)), port)


def _serve(models: list[Served], port: int) -> None:
    metrics = ServerMetrics()
    for m in models:
        metrics.model(m.name, m.role, m.sparsity, m.healthy, m.perplexity)
        state = f"healthy (check perplexity {m.perplexity:.2f})" if m.healthy else f"REJECTED: {m.problem}"
        print(f"{m.role} {m.name}: {m.path} — {m.sparsity:.1%} zeros in its linears, {state}", flush=True)
    import uvicorn

    app = build_app(models, metrics)
    print(f"serving on http://{HOST}:{port}/v1 (OpenAI API), /health, /metrics — Ctrl-C stops", flush=True)
    try:
        uvicorn.run(app, host=HOST, port=port, log_level="warning")
    except KeyboardInterrupt:  # uvicorn shuts down gracefully; some versions raise the Ctrl-C they caught again
        pass
    finally:
        app.state.router.free()
    print("server stopped", flush=True)


@dataclass
class Running:
    """A server started by ``serving``: its base URL (``…/v1`` is the OpenAI API), process and log file."""

    url: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


_RUNNING: set[subprocess.Popen] = set()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _RUNNING.discard(process)


atexit.register(lambda: [_stop(p) for p in list(_RUNNING)])


@contextlib.contextmanager
def serving(model: str | os.PathLike, *, fallback: str | os.PathLike | None = None, port: int | None = None,
            threads: int | None = None, startup_timeout: float = 180.0):
    """``python -m labutils serve`` as a child process, for a ``with`` block: waits until ``/health`` answers, yields
    a ``Running``, and stops the server at the block's end — also on an error, Ctrl-C, or the interpreter's exit.
    LabError with the server's last line when it does not start."""
    check_model(model, "MODEL")
    if fallback is not None:
        check_model(fallback, "--fallback")
    llama_cpp_module()
    port = check_port(port) if port is not None else free_port()
    command = [sys.executable, "-m", "labutils", "serve", os.fspath(model), "--port", str(port)]
    command += ["--fallback", os.fspath(fallback)] if fallback is not None else []
    command += ["--threads", str(threads)] if threads is not None else []
    log = Path(tempfile.mkstemp(prefix="lab-serve-", suffix=".log")[1])
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _RUNNING.add(process)
    running = Running(f"http://{HOST}:{port}", process, log)
    try:
        _wait_ready(running, startup_timeout)
        yield running
    finally:
        _stop(process)


def _wait_ready(running: Running, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            lines = running.log_text().strip().splitlines() or ["(no output)"]
            raise LabError(f"the server exited with status {running.process.returncode}: {lines[-1]}")
        try:
            with urllib.request.urlopen(f"{running.url}/health", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise LabError(f"the server did not answer /health within {timeout:.0f} s (log: {running.log})")
