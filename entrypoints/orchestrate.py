"""Running against a Prefect server: start one if none answers, apply prefect.yaml, start the in-process worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoints.prefect_api import PrefectApi
from entrypoints.prefect_server import (
    IN_PROCESS,
    POOL,
    PREFECT_PORT,
    WORKER_POLL_SECONDS,
    api_healthy,
    deploy_all,
    drain_prefect_workers,
    prefect_env,
    start_server,
    start_worker,
    stop_server,
    stop_worker,
)
from models.errors import TransientError


@dataclass
class PrefectDriver:
    """The demo's (and the CLI's) way to Prefect: its API, the returns database, the UI, the worker serving both."""

    api: PrefectApi
    pipeline: Any
    ui_url: str
    worker: subprocess.Popen[bytes]
    server: subprocess.Popen[bytes] | None = None  # the Prefect server started here, if one was

    def wait_forever(self) -> None:
        """Serve until Ctrl-C, SIGTERM or the worker's end."""
        try:
            while self.worker.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


@contextmanager
def orchestrated(prefect_home: Path, poll_seconds: float = WORKER_POLL_SECONDS) -> Iterator[PrefectDriver]:
    """A Prefect server (PREFECT_API_URL, :4200 or started here) with prefect.yaml applied and the worker serving it."""
    # On exit the worker stops (its runs in flight finish), then any server started here.
    from service.steps import Pipeline

    api_url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{PREFECT_PORT}/api"
    server = None
    if not api_healthy(api_url):
        if os.environ.get("PREFECT_API_URL"):
            raise TransientError(f"the Prefect API at {api_url} does not answer")
        server = start_server(prefect_home)
        os.environ.update(prefect_env(prefect_home))
    else:
        os.environ.setdefault("PREFECT_API_URL", api_url)
    # A supervisor (or `kill`) stops us with SIGTERM: unwind through the `finally` below, or the server started
    # here, which runs in its own session, outlives us and keeps the port.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    prefect_home.mkdir(parents=True, exist_ok=True)
    api = PrefectApi(api_url, os.environ.get("PREFECT_API_AUTH_STRING"))
    worker = None
    try:
        # The worker would create its pool too, but `prefect deploy` refuses a pool that does not exist yet:
        # creating it first lets the worker start while prefect.yaml is applied.
        api.create_work_pool(POOL, IN_PROCESS)
        # A child process, not a thread here: it is the same `prefect worker start` an operator runs, with
        # Prefect's own signal handling (SIGTERM: stop polling, finish the runs in flight), and our process
        # stays a plain HTTP client of the API.
        name = f"{IN_PROCESS}-{socket.gethostname()}-{os.getpid()}"
        worker = start_worker(os.environ | {"PREFECT_WORKER_QUERY_SECONDS": str(poll_seconds)},
                              prefect_home / "worker.log", name=name)
        deploy_all(dict(os.environ), prefect_home / "deploy.log")
        _wait_for_worker(api, worker, name, prefect_home / "worker.log")
        yield PrefectDriver(api, Pipeline.from_env(), api_url.removesuffix("/api"), worker, server)
    finally:
        if worker is not None:
            stop_worker(worker)
        if "prefect" in sys.modules:  # only a process that imported Prefect has buffered logs or events
            drain_prefect_workers()
        if server is not None:
            stop_server(server)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _wait_for_worker(api: PrefectApi, worker: subprocess.Popen[bytes], name: str, log: Path,
                     timeout: float = 120.0) -> None:
    """Until the worker has synced with the API (its first heartbeat); fail at once if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            tail = log.read_text("utf-8", "replace")[-2000:]
            raise TransientError(f"the {IN_PROCESS} worker exited with code {worker.returncode}:\n{tail}")
        if name in api.worker_names(POOL):
            return
        time.sleep(0.2)
    raise TransientError(f"the {IN_PROCESS} worker did not reach the Prefect API within {timeout:.0f} s")
