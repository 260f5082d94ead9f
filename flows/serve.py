"""The process that serves every deployment: registers them, then runs their flow runs in-process.

Why not `flow.serve()`: it starts every run in a fresh Python subprocess (~1.2 s before the run is Running,
PREFECT-NOTES.md), which alone breaks the "RMA within 1 s of the API call" target. This runner polls the
same API endpoint `serve()` polls, claims each run with the same Scheduled -> Pending proposal, and executes
it with Prefect's own engine (`run_flow`) on a thread pool. Deployments, schedules, concurrency limits,
parameter schemas, states, retries, logs and the UI are Prefect's, unchanged.
"""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from adapters.redact import install_redaction

log = logging.getLogger("returns.serve")

PREFECT_PORT = int(os.environ.get("RETURNS_PREFECT_PORT", "4200"))


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: the same names, schedules and limits as prefect.yaml (a test keeps them equal)."""

    name: str
    flow: Any
    description: str
    cron: str | None = None
    interval_seconds: int | None = None
    concurrency_limit: int | None = None
    tags: tuple[str, ...] = ("returns",)


def deployment_specs() -> list[DeploymentSpec]:
    from flows import returns as f
    from flows.reconcile import refund_reconciliation

    return [
        DeploymentSpec("storefront", f.request_return, "API entry point: a storefront asks for a return (P1-P6)."),
        DeploymentSpec("lantana-dock", f.record_receipt, "Operators: record a parcel received at Lantana (P7, R12)."),
        DeploymentSpec("operator", f.process_return, "Operators: process a received return now."),
        DeploymentSpec("operator", f.settle_review, "Operators: authorize or decline a return in review."),
        DeploymentSpec("operator", f.cancel_return, "Operators: withdraw an authorized return."),
        DeploymentSpec("hourly", f.deadline_sweep, "Expire RMAs (R8), escalate deadlines (R9), re-drive stuck ones.",
                       cron="0 * * * *", concurrency_limit=1),
        DeploymentSpec("every-minute", f.outbox_relay, "Deliver pending emails from the outbox.",
                       interval_seconds=60, concurrency_limit=1),
        DeploymentSpec("daily", refund_reconciliation,
                       "Compare recorded refunds with the payment providers' records; differences as a table.",
                       cron="30 6 * * *", concurrency_limit=1),
    ]


def apply_deployments(specs: list[DeploymentSpec]) -> dict[UUID, Any]:
    """Register (or update) every deployment on the API; returns deployment id -> flow."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    ids: dict[UUID, Any] = {}
    for spec in specs:
        schedule = None
        if spec.cron:
            schedule = CronSchedule(cron=spec.cron, timezone="America/New_York")
        elif spec.interval_seconds:
            schedule = IntervalSchedule(interval=timedelta(seconds=spec.interval_seconds))
        dep = spec.flow.to_deployment(
            name=spec.name, description=spec.description, tags=list(spec.tags), schedule=schedule,
            concurrency_limit=spec.concurrency_limit, enforce_parameter_schema=True,
        )
        ids[dep.apply()] = spec.flow
    return ids


class InProcessRunner:
    """Polls for scheduled runs of our deployments, claims each (Pending), runs it with Prefect's engine."""

    def __init__(self, flows: dict[UUID, Any], poll_seconds: float = 0.1, workers: int = 4) -> None:
        self.flows = flows
        self.poll_seconds = poll_seconds
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flow-run")
        self.slots = threading.BoundedSemaphore(workers)
        self.inflight: set[UUID] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run_forever(self, until: Callable[[], bool] | None = None) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while not self.stopping.is_set() and not (until and until()):
                try:
                    self._poll(client)
                except httpx.HTTPError as exc:
                    log.warning("polling the Prefect API failed: %s", exc)
                    time.sleep(1.0)
                self.stopping.wait(self.poll_seconds)
        self.pool.shutdown(wait=True)

    def _poll(self, client: Any) -> None:
        from prefect.states import Pending
        from prefect.types._datetime import now

        runs = client.get_scheduled_flow_runs_for_deployments(
            deployment_ids=list(self.flows), scheduled_before=now("UTC"), limit=50)
        for run in sorted(runs, key=lambda r: r.next_scheduled_start_time or r.created):
            with self.lock:
                if run.id in self.inflight:
                    continue
            if not self.slots.acquire(blocking=False):
                return
            state = client.set_flow_run_state(run.id, Pending())
            if state.status.value != "ACCEPT":
                self.slots.release()
                continue
            with self.lock:
                self.inflight.add(run.id)
            # Settings (heartbeats off) live in context variables: carry them into the worker thread.
            self.pool.submit(contextvars.copy_context().run, self._execute, run)

    def _execute(self, run: Any) -> None:
        from prefect.flow_engine import run_flow

        try:
            flow = self.flows[run.deployment_id]
            run_flow(flow, flow_run=run, parameters=run.parameters, return_type="state")
        except BaseException as exc:  # noqa: BLE001 - the engine records failures; keep serving others
            log.error("flow run %s ended with %s", run.id, type(exc).__name__)
        finally:
            with self.lock:
                self.inflight.discard(run.id)
            self.slots.release()

    def stop(self) -> None:
        self.stopping.set()


# ---- the local Prefect server ----------------------------------------------------------------------------


def api_healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def prefect_env(home: Path, port: int = PREFECT_PORT) -> dict[str, str]:
    """The environment for a local Prefect server and its clients: loopback only, no telemetry."""
    api = f"http://127.0.0.1:{port}/api"
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
    }


def start_server(home: Path, port: int = PREFECT_PORT, timeout: float = 90.0) -> subprocess.Popen[bytes]:
    """Start `prefect server start` on 127.0.0.1 and wait for /api/health; its log goes under `home`."""
    home.mkdir(parents=True, exist_ok=True)
    env = os.environ | prefect_env(home, port)
    logfile = open(home / "server.log", "ab")  # noqa: SIM115 - the server outlives this function
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    api = env["PREFECT_API_URL"]
    while time.monotonic() < deadline:
        if api_healthy(api):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode}; see {home / 'server.log'}")
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"the Prefect server did not answer within {timeout:.0f} s; see {home / 'server.log'}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class _ThreadTimeoutNotice(logging.Filter):
    """Drop Prefect's per-task notice that a timeout cannot interrupt a worker thread: every run here is in
    one, and the timeouts that bite are the I/O clients' own (SMTP 10 s, SQLite busy 30 s, PostgreSQL connect)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout of")


def drain_prefect_workers() -> None:
    """Flush buffered logs and events to the API (before stopping a server, so nothing retries against it)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()


def serve(poll_seconds: float = 0.1, workers: int = 4, until: Callable[[], bool] | None = None) -> None:
    """Register every deployment and run their flow runs here until stopped (or `until()` is true)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    logging.getLogger("prefect.task_runs").addFilter(_ThreadTimeoutNotice())
    install_redaction()  # Prefect ships run logs to its API and UI: no email addresses or phone numbers in them
    # Heartbeats cost ~1 s per run (the engine joins the heartbeat thread); the returns database, not the
    # heartbeat, is what re-drives a crashed run (the sweep's lease).
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        runner = InProcessRunner(apply_deployments(deployment_specs()), poll_seconds=poll_seconds, workers=workers)
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: runner.stop())
        try:
            runner.run_forever(until)
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    serve()
