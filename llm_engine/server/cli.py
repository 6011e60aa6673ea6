"""``llm-engine serve``: load a model and serve it over the OpenAI API until stopped.

SIGINT or SIGTERM stops accepting connections, lets the requests in flight finish
for up to ``--shutdown-timeout`` seconds, aborts the rest, and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from llm_engine.backends import add_backend_arg, apply_backend_args
from llm_engine.engine.config import add_engine_args, add_quantization_arg, engine_config_from_args

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the main CLI's subparsers."""
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve POST /v1/completions, POST /v1/chat/completions (streaming with "
                    "stream=true), GET /v1/models, GET /health and GET /metrics (Prometheus).")
    p.add_argument("--model", default="smollm2", help="model name, .gguf file or checkpoint dir")
    add_engine_args(p)
    add_quantization_arg(p)
    add_backend_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: "
                                                       "127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LLM_ENGINE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ routes (default: "
                        "$LLM_ENGINE_API_KEY, else no key)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as 'model' (default: the --model value)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued beyond the running ones; more get HTTP 503")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds a shutdown waits for requests in flight before aborting them")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the requests that bring no seed of their own")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(command="serve")


def handle(args: argparse.Namespace) -> int:
    """Load the model and serve until SIGINT/SIGTERM; returns 0 after a clean shutdown."""
    from llm_engine import LLM

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    apply_backend_args(args.backend)
    llm = LLM(model=args.model, config=engine_config_from_args(args), seed=args.seed,
              quantization=args.quantization)
    try:
        serve(llm.engine, host=args.host, port=args.port, api_key=args.api_key,
              served_model_name=args.served_model_name or args.model,
              max_waiting=args.max_waiting, shutdown_timeout=args.shutdown_timeout,
              log_level=args.log_level)
    except ImportError as e:
        print(f"llm-engine: error: {e}", file=sys.stderr)
        return 2
    return 0


def serve(engine, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str = "llm_engine", max_waiting: int = 256,
          shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Serve ``engine`` (an :class:`~llm_engine.engine.engine.Engine`, e.g. ``LLM(...).engine``)
    with uvicorn until SIGINT/SIGTERM (graceful shutdown; returns normally)."""
    try:
        import uvicorn

        from llm_engine.server.app import build_app
    except ImportError as e:
        raise ImportError(f"llm-engine serve needs the server extra ({e.name} is missing): "
                          f"pip install 'llm-engine[server]'") from e

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGINT/SIGTERM, once it has shut the server
        down gracefully, is not raised again (uvicorn re-raises it, so the process would
        die of the signal instead of exiting 0)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    app = build_app(engine, served_model_name=served_model_name, api_key=api_key,
                    max_waiting=max_waiting)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout)
    Server(config).run()
