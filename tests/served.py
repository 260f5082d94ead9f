"""The served system: a real `prefect server` with prefect.yaml deployed, a worker, and the storefront's HTTP view."""

# Nothing Prefect runs in the test process (the flow-test harness may already own Prefect's settings here): the
# server, `prefect deploy` and the workers are subprocesses; this process speaks httpx to the API and reads the
# returns database directly.

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import make_pipeline
from helpers import free_port, row_counts
from sqlalchemy import select

from adapters.db import unit_of_work
from entrypoints.demo import shifted_catalog
from entrypoints.prefect_api import PrefectApi
from entrypoints.prefect_server import (
    IN_PROCESS,
    POOL,
    ROOT,
    deploy_all,
    prefect_env,
    start_server,
    start_worker,
    stop_server,
    stop_worker,
)
from models.schemas import ImportIn, parse
from models.tables import Return
from service.steps import Pipeline

REQUESTS: dict[str, dict[str, Any]] = {
    s["request"]["order_number"]: s["request"]
    for s in json.loads((ROOT / "sample" / "requests.json").read_text(encoding="utf-8"))
}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@contextmanager
def prefect_with_deployments(base: Path, pool_type: str = IN_PROCESS) -> Iterator[dict[str, str]]:
    """A `prefect server` (home under `base`) whose `returns` pool has `pool_type`, prefect.yaml deployed; its env."""
    home, port = base / "prefect", free_port()
    with pytest.MonkeyPatch.context() as mp:
        # Only for the server: store events every 0.5 s (default 5 s) so a test sees them without a long wait,
        # and no scheduler, so the hourly and every-minute deployments add no runs beside a test's own; the triggers
        # service on (its default, said here because the automations need it).
        mp.setenv("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL", "0.5")
        mp.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED", "false")
        mp.setenv("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED", "true")
        server = start_server(home, port=port)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RETURNS_"))}
    env |= prefect_env(home, port)
    try:
        PrefectApi(env["PREFECT_API_URL"]).create_work_pool(POOL, pool_type)
        deploy_all(env, base / "deploy.log")
        yield env
    finally:
        stop_server(server)


@dataclass
class Shop:
    """The running system as the storefront sees it (`api`) and as its database holds it (`pipeline`)."""

    api: httpx.Client
    pipeline: Pipeline
    home: Path
    worker: subprocess.Popen[bytes]
    log: Path

    def call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One API call as a storefront makes it: a busy server (503 under SQLite lock contention, 429) is retried."""
        delay = 0.1
        for _ in range(10):
            r = self.api.request(method, url, **kwargs)
            if r.status_code not in (429, 503):
                return r
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        return r

    def deployment(self, name: str) -> dict[str, Any]:
        r = self.call("GET", f"/deployments/name/{name}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def create(self, name: str, parameters: dict[str, Any], idempotency_key: str | None = None,
               start: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"parameters": parameters}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        if start:  # scheduled for then: no worker takes it before
            body["state"] = {"type": "SCHEDULED", "state_details": {"scheduled_time": start}}
        return self.call("POST", f"/deployments/{self.deployment(name)['id']}/create_flow_run", json=body)

    def request(self, order: str) -> str:
        """A storefront's request for `order` (the sample's); the flow run's id."""
        created = self.create("request-return/storefront", REQUESTS[order])
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    def run(self, run_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/flow_runs/{run_id}").json())

    def wait(self, run_id: str, timeout: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if run["state"]["type"] in FINAL:
                return run
            assert self.worker.poll() is None, f"the worker exited; see {self.log}"
            time.sleep(0.1)
        raise AssertionError(f"flow run {run_id} did not finish within {timeout:.0f} s; see {self.log}")

    def states(self, run_id: str) -> list[dict[str, Any]]:
        """The run's state history, oldest first."""
        r = self.call("GET", "/flow_run_states/", params={"flow_run_id": run_id})
        assert r.status_code == 200, r.text
        return sorted(r.json(), key=lambda s: s["timestamp"])

    def flow_runs(self, deployment: str) -> int:
        by_id = {"id": {"any_": [self.deployment(deployment)["id"]]}}
        r = self.call("POST", "/flow_runs/count", json={"deployments": by_id})
        assert r.status_code == 200, r.text
        return int(r.json())

    def rows(self) -> dict[str, int]:
        return row_counts(self.pipeline)

    def returns_of(self, order: str) -> list[Return]:
        with unit_of_work(self.pipeline.engine) as s:
            found = list(s.scalars(select(Return).where(Return.order_number == order)))
            s.expunge_all()
            return found

    def mail(self) -> list[Path]:
        return sorted((self.home / "mail").glob("*.eml"))

    def events(self, rma: str, expected: set[str], timeout: float = 20.0) -> set[str]:
        deadline = time.monotonic() + timeout
        while True:
            about = {"resource": {"id": [f"returns.rma.{rma}"]}}
            r = self.call("POST", "/events/filter", json={"filter": about, "limit": 50})
            assert r.status_code == 200, r.text
            names = {e["event"] for e in r.json()["events"]}
            if expected <= names or time.monotonic() > deadline:
                return names
            time.sleep(0.2)


@contextmanager
def open_shop(base: Path, env: dict[str, str], worker_type: str = IN_PROCESS, limit: int | None = None,
              smtp_url: str | None = None, cwd: Path | None = None, poll: float = 0.2) -> Iterator[Shop]:
    """A fresh sample database under `base` served by one worker of `worker_type`, stopped (SIGTERM) afterwards."""
    base.mkdir(parents=True, exist_ok=True)
    home, url = base / "returns", f"sqlite:///{base / 'returns.db'}"
    pipeline = make_pipeline(home, url)
    pipeline.import_data(parse(ImportIn, shifted_catalog(datetime.now(UTC))))
    worker_env = env | {
        "RETURNS_HOME": str(home), "RETURNS_DATABASE_URL": url,
        "RETURNS_CHECKOUT": str(ROOT),  # the process worker's pull step: where the entrypoints are
        "PREFECT_WORKER_QUERY_SECONDS": str(poll),  # the process worker's only way to find a new run
    } | ({"RETURNS_SMTP_URL": smtp_url} if smtp_url else {})
    log = base / "worker.log"
    worker = start_worker(worker_env, log, worker_type=worker_type, limit=limit, cwd=cwd)
    api = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30)
    try:
        yield Shop(api, pipeline, home, worker, log)
    finally:
        stop_worker(worker, timeout=60)
        api.close()
        pipeline.engine.dispose()
