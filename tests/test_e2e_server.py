"""End to end against a real `prefect server`: the deployments served by `flows.serve.serve()` in a subprocess, and
this test process acting as the storefront and the dock, over plain HTTP only, exactly as they would.

Nothing Prefect runs in this process (the flow-test harness may already own Prefect's settings here): the server and
the serving process are subprocesses; this process speaks httpx to the API and reads the returns database directly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import make_pipeline
from sqlalchemy import func, select
from sqlmodel import SQLModel

import models.tables  # noqa: F401  (registers every table on the metadata)
from adapters.db import unit_of_work
from adapters.label.layout import label_path
from entrypoints.demo import shifted_catalog
from flows.serve import prefect_env, start_server, stop_server
from models.schemas import ImportIn, parse
from models.tables import Return
from service.steps import Pipeline

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

ROOT = Path(__file__).resolve().parent.parent
REQUESTS: dict[str, dict[str, Any]] = {
    s["request"]["order_number"]: s["request"]
    for s in json.loads((ROOT / "sample" / "requests.json").read_text(encoding="utf-8"))
}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

SERVE = "from flows.serve import serve; serve(poll_seconds=0.1)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Shop:
    """The running system as the storefront sees it (`api`) and as its database holds it (`pipeline`)."""

    api: httpx.Client
    pipeline: Pipeline
    home: Path
    serving: subprocess.Popen[bytes]

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

    def create(self, name: str, parameters: dict[str, Any], idempotency_key: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"parameters": parameters}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        return self.call("POST", f"/deployments/{self.deployment(name)['id']}/create_flow_run", json=body)

    def wait(self, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.serving.poll() is None, "the serving process died; see serve.log"
            run = self.call("GET", f"/flow_runs/{run_id}").json()
            if run["state"]["type"] in FINAL:
                return dict(run)
            time.sleep(0.1)
        raise AssertionError(f"flow run {run_id} did not finish within {timeout:.0f} s")

    def flow_runs(self, deployment: str) -> int:
        by_id = {"id": {"any_": [self.deployment(deployment)["id"]]}}
        r = self.call("POST", "/flow_runs/count", json={"deployments": by_id})
        assert r.status_code == 200, r.text
        return int(r.json())

    def rows(self) -> dict[str, int]:
        with unit_of_work(self.pipeline.engine) as s:
            return {t.name: int(s.execute(select(func.count()).select_from(t)).scalar_one())
                    for t in SQLModel.metadata.sorted_tables}

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


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    base = tmp_path_factory.mktemp("e2e")
    home, prefect_home = base / "returns", base / "prefect"
    url = f"sqlite:///{base / 'returns.db'}"
    pipeline = make_pipeline(home, url)
    pipeline.import_data(parse(ImportIn, shifted_catalog(datetime.now(UTC))))

    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        # Only for the server: store events every 0.5 s (default 5 s) so the test sees them without a long wait.
        mp.setenv("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL", "0.5")
        server = start_server(prefect_home, port=port)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RETURNS_"))}
    env |= prefect_env(prefect_home, port) | {
        "RETURNS_HOME": str(home), "RETURNS_DATABASE_URL": url,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    log = open(base / "serve.log", "wb")  # noqa: SIM115 - closed in the teardown below
    serving = subprocess.Popen([sys.executable, "-c", SERVE], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api", timeout=30)
    try:
        deadline = time.monotonic() + 60
        while api.get("/deployments/name/outbox-relay/every-minute").status_code != 200:
            assert serving.poll() is None, (base / "serve.log").read_text("utf-8", "replace")[-3000:]
            assert time.monotonic() < deadline, "the deployments were not registered within 60 s"
            time.sleep(0.2)
        yield Shop(api, pipeline, home, serving)
    finally:
        if serving.poll() is None:
            serving.send_signal(signal.SIGTERM)  # serve() stops polling and lets running flows finish
            try:
                serving.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serving.kill()
                serving.wait()
        log.close()
        api.close()
        stop_server(server)
        pipeline.engine.dispose()


def test_a_storefront_request_and_the_dock_receipt_over_http(shop: Shop) -> None:
    storefront = shop.deployment("request-return/storefront")
    assert storefront["enforce_parameter_schema"] is True
    params = REQUESTS["IS-1001"] | {"idempotency_key": "storefront-e2e-1001"}
    created = shop.create("request-return/storefront", params, idempotency_key="http-e2e-1001")
    assert created.status_code == 201, created.text
    run = shop.wait(created.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["name"] == "request-IS-1001"  # the order, not the customer's email

    out = shop.pipeline.lookup("IS-1001", "storefront-e2e-1001")
    assert out is not None and (out["decision"], out["state"]) == ("authorized", "authorized")
    rma = out["rma_number"]
    pdf = label_path(shop.pipeline.settings.label_dir, rma)
    assert pdf.read_bytes().startswith(b"%PDF")
    assert shop.pipeline.outbox_counts() == {"pending": 0, "sent": 1, "failed": 0}
    (eml,) = shop.mail()
    assert rma in eml.read_text("utf-8")

    key = f"return-{rma.lower()}"
    found = shop.call("POST", "/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}})
    assert found.status_code == 200 and found.json(), found.text
    assert f"# {rma} - authorized" in found.json()[0]["data"]
    assert {"returns.requested", "returns.authorized"} <= shop.events(rma, {"returns.requested", "returns.authorized"})

    dock = shop.deployment("record-receipt/lantana-dock")
    assert dock["enforce_parameter_schema"] is True
    receipt = {"rma": rma, "received_at": datetime.now(UTC).isoformat(), "by": "lantana-dock",
               "lines": [{"sku": "VC-SERUM-30", "unopened": 1, "opened": 0, "damaged": 0, "missing": 0}]}
    created = shop.create("record-receipt/lantana-dock", receipt)
    assert created.status_code == 201, created.text
    run = shop.wait(created.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["name"] == f"receipt-{rma}"
    shown = shop.pipeline.show(rma, datetime.now(UTC))
    assert (shown["state"], shown["refund_total"]) == ("completed", "72.76")
    assert [p["amount"] for p in shown["payments_refunded"]] == ["72.76"]
    assert [(m["kind"], m["status"]) for m in shown["emails"]] == [
        ("rma_issued", "sent"), ("received", "sent"), ("processed", "sent")]
    assert len(shop.mail()) == 3
    latest = shop.call("POST", "/artifacts/latest/filter", json={"artifacts": {"key": {"any_": [key]}}}).json()
    assert f"# {rma} - completed" in latest[0]["data"]
    assert "returns.completed" in shop.events(rma, {"returns.completed"})


@pytest.mark.parametrize(("what", "change"), [
    ("wrong type", {"lines": [{"sku": "VC-SERUM-30", "quantity": "one"}]}),
    ("not one of the reasons", {"reason": "changed my mind"}),
    ("missing field", {"reason": None}),
])
def test_a_malformed_call_is_refused_with_409_and_writes_nothing(shop: Shop, what: str, change: dict[str, Any]) -> None:
    params = {k: v for k, v in (REQUESTS["IS-1004"] | change).items() if v is not None}
    before, runs = shop.rows(), shop.flow_runs("request-return/storefront")
    r = shop.create("request-return/storefront", params)
    assert r.status_code == 409, f"{what}: {r.status_code} {r.text}"
    assert "Validation failed" in r.text or "validation" in r.text.lower(), r.text
    assert shop.flow_runs("request-return/storefront") == runs  # no run was created
    assert shop.rows() == before


def test_an_unknown_extra_key_is_accepted_but_its_run_fails_and_writes_nothing(shop: Shop) -> None:
    before = shop.rows()
    r = shop.create("request-return/storefront", REQUESTS["IS-1004"] | {"coupon": "SPRING"})
    assert r.status_code == 201, r.text  # Prefect's schema check lets unknown keys through (PREFECT-NOTES.md)
    run = shop.wait(r.json()["id"])
    assert run["state"]["type"] == "FAILED", run["state"]
    assert "coupon" in (run["state"]["message"] or ""), run["state"]
    assert shop.rows() == before
    assert shop.returns_of("IS-1004") == []


def test_a_retried_call_with_the_same_idempotency_key_makes_one_run_and_one_return(shop: Shop) -> None:
    params = dict(REQUESTS["IS-1002"])  # the storefront sends no key of its own in the parameters
    params.pop("idempotency_key", None)
    runs = shop.flow_runs("request-return/storefront")
    first = shop.create("request-return/storefront", params, idempotency_key="checkout-7781-return")
    again = shop.create("request-return/storefront", params, idempotency_key="checkout-7781-return")
    assert first.status_code == 201, first.text
    assert again.status_code in (200, 201), again.text
    assert again.json()["id"] == first.json()["id"]
    run = shop.wait(first.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert shop.flow_runs("request-return/storefront") == runs + 1
    (ret,) = shop.returns_of("IS-1002")
    assert ret.state == "authorized" and ret.refund_total_cents == 8004
    assert shop.pipeline.outbox_counts()["pending"] == 0
