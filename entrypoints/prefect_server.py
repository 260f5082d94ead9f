"""The Prefect processes our entry points start: a local `prefect server`, `prefect deploy --all`, a worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

PREFECT_PORT = int(os.environ.get("RETURNS_PREFECT_PORT", "4200"))
ROOT = Path(__file__).resolve().parent.parent  # where prefect.yaml and the entrypoints it names live
POOL = "returns"  # the work pool every deployment in prefect.yaml names
IN_PROCESS = "returns-in-process"  # the worker type of entrypoints/worker.py
# The in-process worker polls as soon as a run is scheduled on its pool (an event); its timed poll is the fallback
# for an event a dropped websocket missed, and each poll is a write on the server.
WORKER_POLL_SECONDS = 5.0


def api_healthy(api_url: str, timeout: float = 1.0, http: httpx.Client | None = None) -> bool:
    """Whether the Prefect API at `api_url` answers /health; pass `http` when asking again and again."""
    # A new client loads the CA bundle into a fresh SSL context, even for http://: ~47 ms of CPU a check against
    # ~1.5 ms on a kept client (measured), and a server's start was 60-100 checks beside the starting server.
    get = http.get if http is not None else httpx.get
    try:
        return get(f"{api_url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_healthy(proc: subprocess.Popen[bytes], api_url: str, give_up: Callable[[], bool]) -> bool:
    """True once the server `proc` started answers at `api_url`; False when `give_up()` says so first; RuntimeError
    if the process exits."""
    with httpx.Client() as http:  # one client for every check (see api_healthy)
        while not api_healthy(api_url, http=http):
            if proc.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with code {proc.returncode}")
            if give_up():
                return False
            time.sleep(0.3)
    return True


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
        # The server started here keeps Prefect's default of no CSRF protection (it listens on loopback only), so
        # its clients skip the token each new client fetches first: two calls per flow run, measured.
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "false",
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        # Task runs are recorded from their clients' state events. Prefect's default writes each event in a
        # transaction of its own (batch size 1): 3 per task run, 7 task runs per return. In batches of up to 100,
        # flushed every second, a task run shows in the UI at most a second later.
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    }


def start_server(home: Path, port: int = PREFECT_PORT, timeout: float = 90.0) -> subprocess.Popen[bytes]:
    """Start `prefect server start` on 127.0.0.1 and wait for /api/health; its log goes under `home`."""
    home.mkdir(parents=True, exist_ok=True)
    env = os.environ | prefect_env(home, port)
    logfile = open(home / "server.log", "ab")  # noqa: SIM115 - the server outlives this function
    proc = subprocess.Popen(
        [sys.executable, "-m", server_command(env), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=ROOT, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        if wait_until_healthy(proc, env["PREFECT_API_URL"], lambda: time.monotonic() >= deadline):
            return proc
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; see {home / 'server.log'}") from None
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


def deploy_all(env: dict[str, str], log: Path, timeout: float = 300.0) -> None:
    """`prefect --no-prompt deploy --all`: register every deployment of prefect.yaml, as an operator would."""
    # Prefect has no public function that reads prefect.yaml and applies it (the CLI's are private), so the
    # supported path is its command line; it resolves the entrypoints relative to the working directory.
    with open(log, "ab") as out:
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT,
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if done.returncode != 0:
        tail = log.read_text("utf-8", "replace")[-2000:]
        raise RuntimeError(f"`prefect deploy --all` exited with code {done.returncode}:\n{tail}")


def start_worker(env: dict[str, str], log: Path, worker_type: str = IN_PROCESS, name: str | None = None,
                 limit: int | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """`prefect worker start --pool returns --type TYPE` in its own session, logging to `log`."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", worker_type]
    cmd += ["--name", name] if name else []
    cmd += ["--limit", str(limit)] if limit else []
    # A busy SQLite server answers 503; Prefect's client gives up after 5 retries and the worker then crashes the
    # run it was submitting ("Failed to submit flow run"): give it the patience our own REST client has.
    env = {"PREFECT_CLIENT_MAX_RETRIES": "12"} | env
    out = open(log, "ab")  # noqa: SIM115 - the worker outlives this function
    # Its own session: a terminal's Ctrl-C reaches only our process, which then sends the worker one SIGTERM (a
    # second signal makes Prefect's worker SIGKILL itself, crashing the runs in flight).
    return subprocess.Popen(cmd, env=env, cwd=cwd or ROOT, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_interruptible)


def _interruptible() -> None:
    """In the worker's child, before exec: SIGINT back to its default disposition."""
    # Prefect's worker stops on SIGTERM by sending itself SIGINT. A shell that starts us in the background
    # (`returns serve &`) leaves SIGINT ignored, which a child inherits: the worker then ignored its stop and was
    # killed after stop_worker's 120 s. Only signal.signal runs here, no lock a parent's thread could hold.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> int:
    """SIGTERM (it stops polling; the in-process type finishes its runs in flight), SIGKILL after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the worker only, not its group: a process worker's runs live there
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def drain_prefect_workers() -> None:
    """Flush buffered logs and events to the API (before stopping a server, so nothing retries against it)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()


def server_command(env: dict[str, str]) -> str:
    """The module a local server runs as: Prefect's CLI, through this module's stdlib_timestamps() on PostgreSQL."""
    # The fix is for PostgreSQL's driver only, so a server on SQLite (the demo, most tests) starts as it always
    # did. `returns demo` on SQLite took 30-96 s with either command here, and once, through the launcher, stalled
    # on a minute of "database is locked"; nothing tied that to the launcher, and nothing on SQLite needs it.
    url = env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") or env.get("PREFECT_API_DATABASE_CONNECTION_URL") or ""
    return "entrypoints.prefect_server" if url.startswith("postgresql") else "prefect"


def stdlib_timestamps() -> bool:
    """The Prefect server binds its timestamps to PostgreSQL as stdlib datetimes (equal values); True once done."""
    # On Python 3.11 and 3.12 Prefect 3.9's timestamps are pendulum DateTimes. asyncpg encodes a timestamptz as its
    # difference from the PostgreSQL epoch, and pendulum's subtraction builds an Interval through a deprecation
    # wrapper: with py-spy on the local server under `bench.pipeline`, 8-9% of all its CPU, most of it in the event
    # persister (about 37 events and 240 event-resource rows per return). The same instant as a plain datetime
    # subtracts in C. Prefect's `Timestamp` column type is the one place every bound timestamp passes; on 3.13
    # Prefect binds stdlib datetimes itself. If an upgrade moves it, nothing is wrapped (a test says so).
    from prefect.server.utilities import database

    column = getattr(database, "Timestamp", None)
    bind = getattr(column, "process_bind_param", None)
    if bind is None:
        return False
    if getattr(bind, "_stdlib", False):
        return True

    def process_bind_param(self: Any, value: datetime | None, dialect: Any) -> datetime | None:
        bound: datetime | None = bind(self, value, dialect)
        if bound is None or type(bound) is datetime or dialect.name != "postgresql":
            return bound
        at = datetime.astimezone(bound, UTC)
        return datetime(at.year, at.month, at.day, at.hour, at.minute, at.second, at.microsecond, UTC)

    process_bind_param._stdlib = True  # type: ignore[attr-defined]
    column.process_bind_param = process_bind_param  # type: ignore[union-attr]
    return True


if __name__ == "__main__":  # the local Prefect server's command line: `prefect ARGS`, timestamps bound as stdlib
    stdlib_timestamps()
    from prefect.cli import app

    app()
