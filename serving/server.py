"""`loong serve`: load the model onto the elastic engine, warm it up, and serve the API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from typing import Any

import uvicorn

from loong_jax.structured.tools import FORMATS, format_for_template
from serving.access import DEFAULT_TENANT_HEADER, ISOLATION, Access
from serving.app import DEFAULT_MAX_BODY_BYTES, Server, build_app
from serving.async_engine import AsyncEngine
from serving.metrics import Metrics

log = logging.getLogger("loong_jax.serving")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require 'Authorization: Bearer KEY'; repeat for several keys (clients or tenants). Default: the "
        "comma-separated LOONG_API_KEY",
    )
    p.add_argument(
        "--admin-key",
        default=os.environ.get("LOONG_ADMIN_KEY"),
        help="the key of the operator routes (/metrics, /server_info); default: any API key",
    )
    p.add_argument(
        "--cache-isolation",
        choices=ISOLATION,
        default="none",
        help="who shares prefix-cache pages: none (everyone, split only by the requests' cache_salt), api-key "
        "(each API key apart) or header (each tenant named by --tenant-header apart)",
    )
    p.add_argument(
        "--tenant-header",
        default=DEFAULT_TENANT_HEADER,
        help="the header naming the tenant with --cache-isolation header (set by a proxy you trust)",
    )
    p.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        help="let browser pages from this origin call the API (CORS); repeat for several, '*' for any. Default: none",
    )
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: the file's)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=None,
        help="tokens one prefill pass may compute; longer prompts are prefilled in chunks that append to the "
        "K/V of those before (default: --max-model-len: every prompt in one pass)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted; larger ones get 413 (default 64 MiB)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=sorted(FORMATS),
        default=None,
        help="how the model writes tool calls (default: from its chat template; Hermes where it does not say)",
    )
    p.add_argument("--no-warmup", action="store_true", help="compile programs on first use instead of at start")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to finish running requests on SIGTERM")


def start_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> tuple[str, uvicorn.Server]:
    """Serve an app from a background thread (tests, benchmarks); returns its URL once it is healthy."""
    import httpx  # noqa: PLC0415 (a test and benchmark dependency; `loong serve` runs without it)

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, name="uvicorn", daemon=True).start()
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return url, server
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"the server at {url} did not become healthy")


def build_server(
    llm,
    model_name: str,
    access: Access | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    tool_call_parser: str | None = None,
) -> tuple[Server, AsyncEngine]:
    """The routes' state around a loaded LLM (access: keys, cache isolation, CORS; default: open; the tool
    call format: from the chat template); the engine thread is started here."""
    metrics = Metrics(llm.engine.ecfg.num_instances, llm.engine.kv_capacity)
    engine = AsyncEngine(llm.engine, metrics.on_iteration)
    engine.start()
    tools = format_for_template(llm.tokenizer.chat_template, tool_call_parser)
    server = Server(engine, llm.tokenizer, model_name, metrics, access or Access(), max_body_bytes, tools)
    return server, engine


def access_from_args(args: argparse.Namespace) -> Access:
    """The access rules the serve options describe (ValueError naming what is inconsistent)."""
    keys = args.api_key if args.api_key is not None else os.environ.get("LOONG_API_KEY", "").split(",")
    return Access(
        api_keys=tuple(k.strip() for k in keys if k.strip()),
        admin_key=args.admin_key or None,
        cache_isolation=args.cache_isolation,
        tenant_header=args.tenant_header,
        allowed_origins=tuple(args.allowed_origin),
    )


def serve(args: argparse.Namespace, llm: Any) -> int:
    """Warm the loaded model up and serve it until SIGTERM / Ctrl-C (running requests finish first)."""
    if llm.tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer; the server needs one")
    access = access_from_args(args)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model or "SmolLM2-135M-Instruct"))
    e = llm.engine.ecfg
    log.info(
        "model %s: %s, %d instance(s) x tp=%d, max context %d tokens",
        name,
        llm.config.name,
        e.num_instances,
        e.tp,
        e.max_model_len,
    )
    if not args.no_warmup:
        llm.warmup(show_progress=True)  # logs how many programs it compiled and how long it took
    server, engine = build_server(llm, name, access, args.max_body_bytes, args.tool_call_parser)
    app = build_app(server, on_shutdown=lambda: engine.shutdown(args.shutdown_timeout))
    log.info("listening on http://%s:%d (OpenAI-compatible API under /v1)", args.host, args.port)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=int(args.shutdown_timeout)
    )
    uvicorn.Server(config).run()
    return 0
