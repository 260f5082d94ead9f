"""A client of Prefect's REST API for our entry points: create a deployment's flow run, wait for it, read back
what it left (its artifacts)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from models.errors import PermanentError, TransientError

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
BUSY = (429, 503)  # the server asks us to come back (SQLite lock contention answers 503)


class RunFailed(PermanentError):
    """A flow run ended in a failed state; the message is the state's."""


class PrefectApi:
    """The HTTP calls a storefront or an operator tool makes: create a deployment's flow run, watch it."""

    def __init__(self, api_url: str, auth: str | None = None, patience: float = 120.0) -> None:
        self.api_url = api_url.rstrip("/")
        headers = {"Authorization": f"Basic {auth}"} if auth else {}
        self.http = httpx.Client(base_url=self.api_url, timeout=30, headers=headers)
        self.patience = patience
        self._deployments: dict[str, str] = {}
        self.busy: dict[int, int] = {}  # busy answers retried, by status (the benchmark reports them)

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One API call, retried with capped backoff while the server is busy or unreachable, until `patience`
        seconds have passed (a count of attempts gave up within seconds under load)."""
        deadline = time.monotonic() + self.patience
        delay = 0.05
        while True:
            try:
                r = self.http.request(method, url, **kwargs)
                if r.status_code not in BUSY:
                    return r
                self.busy[r.status_code] = self.busy.get(r.status_code, 0) + 1
                failure = f"the Prefect API stayed busy (HTTP {r.status_code})"
            except httpx.TransportError as exc:
                failure = f"the Prefect API at {self.api_url} did not answer ({type(exc).__name__})"
            if time.monotonic() + delay > deadline:
                raise TransientError(failure)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def deployment_id(self, name: str) -> str:
        if name not in self._deployments:
            r = self._call("GET", f"/deployments/name/{name}")
            if r.status_code == 404:
                raise TransientError(f"deployment {name} is not registered on the Prefect API (is the worker up?)")
            r.raise_for_status()
            self._deployments[name] = r.json()["id"]
        return self._deployments[name]

    def create_work_pool(self, name: str, worker_type: str) -> bool:
        """Create the work pool unless it exists (its worker fills in its job template); whether it was made."""
        r = self._call("POST", "/work_pools/", json={"name": name, "type": worker_type})
        if r.status_code == 409:
            return False
        r.raise_for_status()
        return True

    def worker_names(self, pool: str) -> set[str]:
        """The workers that have sent the pool a heartbeat."""
        r = self._call("POST", f"/work_pools/{pool}/workers/filter", json={})
        r.raise_for_status()
        return {str(w["name"]) for w in r.json()}

    def create_run(self, deployment: str, parameters: dict[str, Any], idempotency_key: str | None = None,
                   start_in: float = 0.0, tags: list[str] | None = None) -> str:
        """A run of the deployment scheduled `start_in` s from now; the same key, the same run. Its id."""
        run, _ = self.new_run(deployment, parameters, idempotency_key, start_in=start_in, tags=tags)
        return str(run["id"])

    def new_run(self, deployment: str, parameters: dict[str, Any], idempotency_key: str | None = None, *,
                start_in: float = 0.0, tags: list[str] | None = None, pending: bool = False,
                checked: bool = False) -> tuple[dict[str, Any], bool]:
        """POST /deployments/{id}/create_flow_run (Pending when `pending`, else scheduled `start_in` s from now;
        `checked`: parameters our code built, not checked again against the deployment's schema): the run as the
        server answered, and whether this call made it (False: an earlier call with the key did)."""
        body: dict[str, Any] = {"parameters": parameters}
        if checked:
            # The engine validates them against the flow's signature when the run starts, as for every run; the
            # server's check repeats that with jsonschema, checking the schema itself first: ~7 ms of its CPU per
            # run, measured with py-spy under bench.pipeline (docs/benchmarks.md).
            body["enforce_parameter_schema"] = False
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        if tags:
            body["tags"] = tags
        if pending:
            body["state"] = {"type": "PENDING", "name": "Pending"}
        elif start_in:
            at = datetime.now(UTC) + timedelta(seconds=start_in)
            body["state"] = {"type": "SCHEDULED", "name": "Scheduled",
                             "state_details": {"scheduled_time": at.isoformat()}}
        r = self._call("POST", f"/deployments/{self.deployment_id(deployment)}/create_flow_run", json=body)
        if r.status_code == 409:
            raise PermanentError(f"refused by the Prefect API: {str(r.json().get('detail', r.text))[:300]}")
        r.raise_for_status()
        return dict(r.json()), r.status_code == 201

    def run_state(self, run_id: str) -> tuple[str, str]:
        """The run's state type (SCHEDULED, RUNNING, COMPLETED, FAILED, ...) and its message."""
        r = self._call("GET", f"/flow_runs/{run_id}")
        r.raise_for_status()
        state = r.json().get("state") or {}
        return str(state.get("type", "SCHEDULED")), str(state.get("message") or "")

    def wait(self, run_id: str, timeout: float = 300.0, poll: float = 0.05, max_poll: float = 0.5) -> dict[str, Any]:
        """The finished run; RunFailed with its state's message unless it completed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self._call("GET", f"/flow_runs/{run_id}")
            r.raise_for_status()
            run = r.json()
            if run["state"]["type"] in FINAL:
                if run["state"]["type"] != "COMPLETED":
                    raise RunFailed(f"flow run {run['name']} {run['state']['type'].lower()}: "
                                    f"{(run['state'].get('message') or '')[:300]}")
                return dict(run)
            time.sleep(poll)
            poll = min(poll * 1.5, max_poll)
        raise TransientError(f"flow run {run_id} did not finish within {timeout:.0f} s")

    def run(self, deployment: str, parameters: dict[str, Any], idempotency_key: str | None = None) -> str:
        """Create a run and wait for it to complete; its id."""
        run_id = self.create_run(deployment, parameters, idempotency_key)
        self.wait(run_id)
        return run_id

    def table_artifact(self, run_id: str, key: str) -> list[dict[str, Any]]:
        """The rows of the table artifact `key` that the run created (none if it made none)."""
        r = self._call("POST", "/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": [key]}}, "limit": 1})
        r.raise_for_status()
        found = r.json()
        if not found:
            return []
        data = found[0]["data"]
        rows = json.loads(data) if isinstance(data, str) else data
        return [dict(row) for row in rows]
