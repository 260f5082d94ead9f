"""`returns serve`: what a laptop needs in one process tree: the local Prefect server (unless PREFECT_API_URL
answers), the worker serving the deployments, and the API on RETURNS_API_HOST:RETURNS_API_PORT. SIGTERM (or
Ctrl-C) stops all of it."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from entrypoints.api.app import create_app
from entrypoints.api.config import ApiConfig
from entrypoints.api.submit import ThroughPrefect


def uvicorn_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for `app`; its access log has paths only (keys travel in headers, never logged)."""
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                         server_header=False, timeout_graceful_shutdown=10))


@contextmanager
def api_thread(app: FastAPI, host: str, port: int) -> Iterator[str]:
    """The API served on a thread of this process (tests, the demo); its base URL until the block ends."""
    server = uvicorn_server(app, host, port)
    thread = threading.Thread(target=server.run, name="returns-api", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the API could not listen on {host}:{port}")
        threading.Event().wait(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def run_serve() -> int:
    """Serve until SIGTERM or Ctrl-C; prints the API's and the Prefect UI's addresses."""
    from entrypoints.cli import ensure_schema
    from entrypoints.orchestrate import orchestrated
    from service.steps import Pipeline

    pipeline = Pipeline.from_env()
    ensure_schema(pipeline)
    config = ApiConfig.from_env(pipeline.settings.home)
    with orchestrated(pipeline.settings.home / "prefect") as driver:
        submitter = ThroughPrefect.over(driver.api, pipeline, threads=config.run_threads)
        submitter.recover()
        server = uvicorn_server(create_app(pipeline, submitter, config), config.host, config.port)
        _say({"api": f"http://{config.host}:{config.port}", "docs": f"http://{config.host}:{config.port}/docs",
              "prefect_ui": driver.ui_url})
        try:
            server.run()  # uvicorn turns SIGTERM/SIGINT into a graceful stop, then re-raises it for orchestrated()
        finally:
            submitter.close()  # the request runs in flight here finish before the worker and the server stop
    return 0


def _say(urls: dict[str, Any]) -> None:
    sys.stdout.write("".join(f"{k}: {v}\n" for k, v in urls.items()))
    sys.stdout.flush()
