"""Running against a Prefect server: start one if none answers, serve the deployments, trigger runs over HTTP."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from entrypoints.prefect_api import PrefectApi
from flows.serve import (
    PREFECT_PORT,
    api_healthy,
    drain_prefect_workers,
    prefect_env,
    serve,
    start_server,
    stop_server,
)
from models.errors import TransientError
from models.schemas import ReceiptIn, ReturnRequestIn


class PrefectDriver:
    """The demo's (and the CLI's) way through Prefect: every stage is a run of its deployment."""

    def __init__(self, api: PrefectApi, pipeline: Any, ui_url: str, stop: threading.Event) -> None:
        self.api, self.pipeline, self.ui_url, self._stop = api, pipeline, ui_url, stop
        self._reported = 0

    def request(self, req: ReturnRequestIn) -> dict[str, Any]:
        params = req.model_dump(mode="json", exclude_none=True)
        self.api.run("request-return/storefront", params, idempotency_key=req.idempotency_key)
        assert req.idempotency_key is not None
        out = self.pipeline.lookup(req.order_number, req.idempotency_key)
        assert out is not None
        return dict(out)

    def review(self, rma: str, note: str) -> dict[str, Any]:
        self.api.run("settle-review/operator", {"rma": rma, "authorize": True, "note": note, "by": "demo-operator"})
        return {"state": self.pipeline.show(rma, datetime.now().astimezone())["state"]}

    def receive(self, receipt: ReceiptIn) -> dict[str, Any]:
        self.api.run("record-receipt/lantana-dock", receipt.model_dump(mode="json"))
        shown = self.pipeline.show(receipt.rma, datetime.now().astimezone())
        out = {"state": shown["state"]}
        if shown["state"] == "completed":
            out["refund_total"] = shown["refund_total"]
        return out

    def sweep(self, as_of: datetime) -> None:
        self.api.run("deadline-sweep/hourly", {"as_of": as_of.isoformat()})

    def relay(self) -> dict[str, int]:
        """Run the relay deployment; report what was sent since the last report (the stage flows send too)."""
        self.api.run("outbox-relay/every-minute", {})
        counts = self.pipeline.outbox_counts()
        sent, self._reported = counts["sent"] - self._reported, counts["sent"]
        return {"sent": sent, "failed": counts["failed"]}

    def wait_forever(self) -> None:
        try:
            while not self._stop.is_set():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


@contextmanager
def orchestrated(prefect_home: Path, poll_seconds: float = 0.1) -> Iterator[PrefectDriver]:
    """A reachable Prefect server (PREFECT_API_URL, one on :4200, or one started here) serving our deployments."""
    from service.steps import Pipeline

    api_url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{PREFECT_PORT}/api"
    proc = None
    if not api_healthy(api_url):
        if os.environ.get("PREFECT_API_URL"):
            raise TransientError(f"the Prefect API at {api_url} does not answer")
        proc = start_server(prefect_home)
        os.environ.update(prefect_env(prefect_home))
    else:
        os.environ.setdefault("PREFECT_API_URL", api_url)
    # A supervisor (or `kill`) stops us with SIGTERM: unwind through the `finally` below, or the server started
    # here, which runs in its own session, outlives us and keeps the port.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    stop = threading.Event()
    server_thread = threading.Thread(target=serve, kwargs={"poll_seconds": poll_seconds, "until": stop.is_set},
                                     name="returns-serve", daemon=True)
    server_thread.start()
    api = PrefectApi(api_url, os.environ.get("PREFECT_API_AUTH_STRING"))
    try:
        _wait_for_deployments(api)
        yield PrefectDriver(api, Pipeline.from_env(), api_url.removesuffix("/api"), stop)
    finally:
        stop.set()
        server_thread.join(timeout=30)
        drain_prefect_workers()
        if proc is not None:
            stop_server(proc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _wait_for_deployments(api: PrefectApi, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            api.deployment_id("outbox-relay/every-minute")
            return
        except httpx.HTTPStatusError:
            time.sleep(0.2)
    raise TransientError("the deployments were not registered in time")
