"""A client of Prefect's REST API for our entry points: create a deployment's flow run, wait for it to end."""

from __future__ import annotations

import time
from typing import Any

import httpx

from models.errors import PermanentError, TransientError

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class RunFailed(PermanentError):
    """A flow run ended in a failed state; the message is the state's."""


class PrefectApi:
    """The HTTP calls a storefront or an operator tool makes: create a deployment's flow run, watch it."""

    def __init__(self, api_url: str, auth: str | None = None) -> None:
        self.api_url = api_url.rstrip("/")
        headers = {"Authorization": f"Basic {auth}"} if auth else {}
        self.http = httpx.Client(base_url=self.api_url, timeout=30, headers=headers)
        self._deployments: dict[str, str] = {}

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One API call, retried with backoff while the server is busy (503/429) or unreachable."""
        delay = 0.05
        for attempt in range(12):
            try:
                r = self.http.request(method, url, **kwargs)
                if r.status_code not in (429, 503):
                    return r
            except httpx.TransportError:
                if attempt == 11:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        return r

    def deployment_id(self, name: str) -> str:
        if name not in self._deployments:
            r = self._call("GET", f"/deployments/name/{name}")
            r.raise_for_status()
            self._deployments[name] = r.json()["id"]
        return self._deployments[name]

    def create_run(self, deployment: str, parameters: dict[str, Any], idempotency_key: str | None = None) -> str:
        """POST /deployments/{id}/create_flow_run; the same idempotency key returns the same run."""
        body: dict[str, Any] = {"parameters": parameters}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        r = self._call("POST", f"/deployments/{self.deployment_id(deployment)}/create_flow_run", json=body)
        if r.status_code == 409:
            raise PermanentError(f"refused by the Prefect API: {r.json().get('detail', r.text)[:300]}")
        r.raise_for_status()
        return str(r.json()["id"])

    def wait(self, run_id: str, timeout: float = 120.0, poll: float = 0.05) -> dict[str, Any]:
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
        raise TransientError(f"flow run {run_id} did not finish within {timeout:.0f} s")

    def run(self, deployment: str, parameters: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        return self.wait(self.create_run(deployment, parameters, idempotency_key))
