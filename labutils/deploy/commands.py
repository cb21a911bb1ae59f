"""The deployment commands of ``python -m labutils``: ``serve`` and ``loadtest`` (their parsers and what they run;
``cli.py`` adds them beside the others)."""
from __future__ import annotations

import argparse

import pandas as pd

from .loadtest import MAX_CLIENTS, MAX_DURATION, MAX_REQUESTS, MAX_TOKENS, check_url, load_test
from .server import DEFAULT, serve


def add_commands(sub) -> dict:
    """Add ``serve`` and ``loadtest`` to the subparsers ``sub``; returns {command: function(args)}."""
    server = sub.add_parser("serve", help="serve a pruned model on 127.0.0.1 through llama.cpp's OpenAI-compatible "
                                          "server, with a dense fallback and /metrics (make setup-deploy first)")
    server.add_argument("model", metavar="MODEL", help="a .gguf file, or a lab output folder (exported to f16 GGUF "
                                                       "once, in the lab's cache)")
    server.add_argument("--fallback", metavar="DENSE", default=None,
                        help=f"the model that answers when MODEL fails its start-up check or a request: a .gguf file, "
                             f"a lab output folder, or '{DEFAULT}' (the embedded dense model's own GGUF file)")
    server.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")
    server.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core)")
    server.add_argument("--ctx", type=int, default=2048, help="context length per request (default 2048)")
    load = sub.add_parser("loadtest", help="concurrent clients against a lab server on this machine: P50/P95 "
                                           "latency, tokens/s, errors, which model answered, server memory")
    load.add_argument("url", metavar="URL", help="the server, e.g. http://127.0.0.1:8080 (loopback only)")
    load.add_argument("--clients", type=int, default=8, help=f"concurrent clients, 1–{MAX_CLIENTS} (default 8)")
    load.add_argument("--requests", type=int, default=32,
                      help=f"completions in all, 1–{MAX_REQUESTS} (default 32)")
    load.add_argument("--max-tokens", type=int, default=32, help=f"tokens per completion, 1–{MAX_TOKENS} (default 32)")
    load.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take (default 120)")
    load.add_argument("--duration", type=float, default=600.0,
                      help=f"stop sending after this many seconds, at most {MAX_DURATION:g} (default 600)")
    load.add_argument("--json", dest="json_path", default=None, help="also write the result to this JSON file")
    return {"serve": _serve, "loadtest": _loadtest}


def _serve(args: argparse.Namespace) -> None:
    serve(args.model, fallback=args.fallback, port=args.port, threads=args.threads, n_ctx=args.ctx)


def _loadtest(args: argparse.Namespace) -> None:
    from ..core.manifests import write_json_atomic
    from ..core.publish import check_can_write

    check_url(args.url)
    path = check_can_write(args.json_path, "--json") if args.json_path else None
    result = load_test(args.url, clients=args.clients, requests=args.requests, max_tokens=args.max_tokens,
                       timeout=args.timeout, duration=args.duration)
    summary = result.summary()
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame([summary]).T.rename(columns={0: "value"}).to_string(float_format=lambda v: f"{v:.3f}"))
    if result.first_error:
        print(f"first error: {result.first_error}")
    if path is not None:
        write_json_atomic(path, result.to_json())
        print(f"wrote {path}")
