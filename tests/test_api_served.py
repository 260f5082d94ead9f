"""`returns serve` end to end: a subprocess runs the local Prefect server, the worker and the API, as on a laptop; this
process is a storefront over HTTP (its key made with the pipeline, as `returns api-key create` does), a webhook
receiver on loopback, and the dock (a run of its deployment). Afterwards no Prefect object holds an email address,
and SIGTERM stops every process the command started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from conftest import ROOT, SAMPLE, make_pipeline
from fake_providers import FakeStripe
from fake_providers import serve as serve_fake
from helpers import WebhookReceiver, free_port, stripe_refund_event, stripe_signature, terminate, webhook_receiver

from adapters.webhooks import verify
from entrypoints.demo import shifted_catalog
from entrypoints.prefect_api import PrefectApi
from entrypoints.verbs import ThroughPrefect
from models.schemas import ImportIn, ReceiptIn, parse
from service.steps import Pipeline

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

REQUESTS: dict[str, dict[str, Any]] = {
    s["request"]["order_number"]: {k: v for k, v in s["request"].items() if k != "idempotency_key"}
    for s in json.loads((SAMPLE / "requests.json").read_text(encoding="utf-8"))
}
SECRET: dict[str, str] = {}
STRIPE_WEBHOOK_SECRET = "whsec_served_test"
EMAILS = {c["email"] for c in json.loads((SAMPLE / "catalog.json").read_text(encoding="utf-8"))["customers"]}


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as found:
        yield found


@dataclass
class Served:
    api: httpx.Client
    prefect: PrefectApi
    pipeline: Pipeline
    proc: subprocess.Popen[bytes]
    ports: tuple[int, int]
    log: Path

    def ask(self, order: str, key: str, wait: str | None = None, **change: Any) -> httpx.Response:
        headers = {"Idempotency-Key": key} | ({"Prefer": f"wait={wait}"} if wait is not None else {})
        return self.api.post("/v1/returns", json=REQUESTS[order] | change, headers=headers)


@pytest.fixture(scope="module")
def stripe() -> Iterator[tuple[FakeStripe, str]]:
    fake = FakeStripe()
    with serve_fake(fake) as url:
        yield fake, url


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, receiver: WebhookReceiver,
           stripe: tuple[FakeStripe, str]) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("serve")
    url = f"sqlite:///{base / 'returns.db'}"
    pipeline = make_pipeline(base / "home", url)
    pipeline.import_data(parse(ImportIn, shifted_catalog(datetime.now(UTC))))
    key = pipeline.create_api_key("storefront-test", datetime.now(UTC))
    SECRET["webhook"] = pipeline.add_webhook(receiver.url, datetime.now(UTC))["secret"]
    api_port, prefect_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RETURNS_"))} | {
        "RETURNS_HOME": str(base / "home"), "RETURNS_DATABASE_URL": url,
        "RETURNS_API_PORT": str(api_port), "RETURNS_PREFECT_PORT": str(prefect_port),
        # The tests expect 201s: a busy machine must make the flow slower, not the answer a 202 (which has its test).
        "RETURNS_API_WAIT": "90",
        "RETURNS_STRIPE_API_KEY": stripe[0].api_key, "RETURNS_STRIPE_API_BASE": stripe[1],
        "RETURNS_STRIPE_WEBHOOK_SECRET": STRIPE_WEBHOOK_SECRET,
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    log = base / "serve.log"
    with open(log, "wb") as out:
        # Started as a shell starts a background job (`returns serve &`): SIGINT ignored, which children inherit.
        proc = subprocess.Popen([sys.executable, "-m", "entrypoints.cli", "serve"], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=_as_a_background_job)
    api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {key}"},
                       timeout=60)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text("utf-8", "replace")[-3000:]
            assert time.monotonic() < deadline, "returns serve did not answer within 120 s"
            try:
                if api.get("/openapi.json").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        prefect = PrefectApi(f"http://127.0.0.1:{prefect_port}/api")
        yield Served(api, prefect, pipeline, proc, (api_port, prefect_port), log)
    finally:
        terminate(proc)
        api.close()


def test_serve_prints_the_api_and_the_prefect_ui(served: Served) -> None:
    printed = served.log.read_text("utf-8", "replace")
    assert f"api: http://127.0.0.1:{served.ports[0]}" in printed
    assert f"prefect_ui: http://127.0.0.1:{served.ports[1]}" in printed


def test_quote_then_request_201_with_rma_and_label_then_replay_and_reuse(served: Served,
                                                                        receiver: WebhookReceiver) -> None:
    quote = served.api.post("/v1/quotes", json=REQUESTS["IS-1001"])
    assert quote.status_code == 200 and quote.json()["decision"] == "authorized", quote.text

    r = served.ask("IS-1001", "served-1001")
    assert r.status_code == 201, r.text
    out = r.json()
    rma = out["rma_number"]
    assert (out["decision"], out["label_url"]) == ("authorized", f"/v1/returns/{rma}/label.pdf")
    label = served.api.get(out["label_url"])
    assert label.status_code == 200 and label.content.startswith(b"%PDF-")

    again = served.ask("IS-1001", "served-1001")
    assert (again.status_code, again.json(), again.headers.get("Idempotent-Replayed")) == (201, out, "true")
    other = served.ask("IS-1001", "served-1001", reason="damaged")
    assert other.status_code == 422 and other.headers["content-type"].startswith("application/problem+json")

    # the request flow ran as a run of the storefront deployment, with ids only, claimed and run by the API's own
    # process (the worker's runs name the worker's host and pid), with its stages as task runs
    (run,) = [r for r in flow_runs(served) if r["parameters"].get("request_ref") == out["request"]]
    assert run["name"] == "request-IS-1001" and "email" not in run["parameters"]
    assert run["deployment_id"] == served.prefect.deployment_id("request-return/storefront")
    run = served.prefect.wait(run["id"], timeout=90)  # the 201 comes once the label is written, the run ends after
    assert run["infrastructure_pid"].startswith("returns-api:"), run
    assert "run-by-storefront-api" in run["tags"]  # what hand_back_orphans looks for
    # created already claimed (Pending): never Scheduled, so no worker poll could take it
    states = served.prefect._call("GET", "/flow_run_states/", params={"flow_run_id": run["id"]}).json()
    assert [st["type"] for st in sorted(states, key=lambda st: st["timestamp"])] == ["PENDING", "RUNNING", "COMPLETED"]
    stages, deadline = {"store-decision", "render-label", "notify"}, time.monotonic() + 30
    while True:  # the server records task runs from their events in batches, flushed every second
        tasks = served.prefect._call("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}})
        names = {t["name"].rsplit("-", 1)[0] for t in tasks.json()}
        if stages <= names or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stages <= names

    # the webhook: return.authorized, signed over the timestamp and the body
    assert "return.authorized" in receiver.wait_for({"return.authorized"})
    header, body = next((h, b) for h, b in receiver.got if json.loads(b)["rma_number"] == rma)
    assert verify(SECRET["webhook"], header, body, now=int(time.time()))
    assert not verify(SECRET["webhook"], header, body.replace(b"authorized", b"completed"), now=int(time.time()))


def test_the_api_never_starts_a_request_run_again_once_it_has_finished(served: Served) -> None:
    """A late call with the same key finds the finished run (200, not 201) and leaves it alone."""
    from entrypoints.api.submit import RunsHere

    (run,) = [r for r in flow_runs(served) if r["name"] == "request-IS-1001"]
    assert served.prefect.wait(run["id"], timeout=90)["state"]["type"] == "COMPLETED"
    again, made = served.prefect.new_run("request-return/storefront", run["parameters"], run["idempotency_key"],
                                         pending=True, tags=[RunsHere.TAG])
    assert (again["id"], made, again["state"]["type"]) == (run["id"], False, "COMPLETED")
    states = served.prefect._call("GET", "/flow_run_states/", params={"flow_run_id": run["id"]}).json()
    assert [st["type"] for st in states].count("PENDING") == 1, states


def test_a_request_run_an_api_process_died_holding_goes_back_to_the_worker(served: Served) -> None:
    """The API claimed a run and died (its pid is gone): the next API process to start hands it to the worker."""
    import socket

    from entrypoints.api.submit import RunsHere

    (done,) = [r for r in flow_runs(served) if r["name"] == "request-IS-1001"]
    run_id = served.prefect.create_run("request-return/storefront", done["parameters"], "orphan-test", start_in=600)
    gone = subprocess.Popen(["true"])
    gone.wait()
    claimed = served.prefect._call("POST", f"/flow_runs/{run_id}/set_state", json={"state": {"type": "PENDING"}})
    assert claimed.json()["status"] == "ACCEPT", claimed.text
    served.prefect._call("PATCH", f"/flow_runs/{run_id}",
                         json={"infrastructure_pid": f"returns-api:{socket.gethostname()}:{gone.pid}"})
    # and one its creator made already claimed but died before marking as its own (no holder), a minute ago
    unmarked, made = served.prefect.new_run("request-return/storefront", done["parameters"], "unmarked-test",
                                            pending=True, tags=[RunsHere.TAG])
    assert made
    here = RunsHere(served.prefect.api_url, threads=1)
    here.UNMARKED_AFTER = 0.0  # rather than waiting a minute
    try:
        handed = here.hand_back_orphans(UUID(done["deployment_id"]))
        assert sorted(str(r) for r in handed) == sorted([run_id, unmarked["id"]])
        assert here.hand_back_orphans(UUID(done["deployment_id"])) == []  # the worker has them now, or soon
    finally:
        here.close()
    for orphan in (run_id, unmarked["id"]):
        run = served.prefect.wait(orphan, timeout=90)  # the same request again: its steps find it decided
        assert not (run["infrastructure_pid"] or "").startswith("returns-api:"), run


def test_parameters_the_server_did_not_check_are_still_checked_when_the_run_starts(served: Served) -> None:
    """The API's runs skip the server's schema check (`checked`): the engine's own check fails a bad one, with
    the parameter named, and the server refuses the same parameters when it does check them."""
    from entrypoints.prefect_api import PermanentError, RunFailed

    bad = {"order_number": "IS-9999", "reason": "no-such-reason", "lines": []}
    run, made = served.prefect.new_run("request-return/storefront", bad, "unchecked-test", checked=True)
    assert made
    with pytest.raises(RunFailed, match="reason"):
        served.prefect.wait(run["id"], timeout=90)
    with pytest.raises(PermanentError, match="no-such-reason"):
        served.prefect.new_run("request-return/storefront", bad, "checked-test")


def test_a_short_wait_answers_202_then_the_status_url_has_the_decision(served: Served) -> None:
    r = served.ask("IS-1004", "served-1004", wait="0")
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == r.json()["status_url"] and r.json()["status"] == "pending"
    deadline = time.monotonic() + 60
    while (status := served.api.get(r.headers["Location"]).json()).get("status") == "pending":
        assert time.monotonic() < deadline, "the request flow did not finish within 60 s"
        time.sleep(0.2)
    assert status["decision"] == "authorized" and status["rma_number"], status
    replay = served.ask("IS-1004", "served-1004")
    assert (replay.status_code, replay.json(), replay.headers["Idempotent-Replayed"]) == (201, status, "true")


def test_concurrent_calls_with_one_key_make_one_run_and_one_return(served: Served) -> None:
    answers: list[httpx.Response] = []
    start = threading.Barrier(3)

    def call() -> None:
        start.wait()
        answers.append(served.ask("IS-1007", "served-1007-race"))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [201, 201, 201], [a.text for a in answers]
    assert len({a.json()["rma_number"] for a in answers}) == 1
    assert len(served.pipeline.order_returns("IS-1007", datetime.now(UTC))) == 1
    refs = {a.json()["request"] for a in answers}
    assert len([r for r in flow_runs(served) if r["parameters"].get("request_ref") in refs]) == 1


def test_the_dock_receipt_completes_it_and_every_transition_reaches_the_webhook(served: Served,
                                                                               receiver: WebhookReceiver) -> None:
    rma = served.ask("IS-1011", "served-1011").json()["rma_number"]
    verbs = ThroughPrefect(served.prefect, served.pipeline)
    verbs.receive(parse(ReceiptIn, {"rma": rma, "received_at": datetime.now(UTC).isoformat(), "by": "dock",
                                    "lines": [{"sku": "AG-RET-SRM", "unopened": 1},
                                              {"sku": "IL-FIRM-MASK", "unopened": 1}]}))
    status = served.api.get(f"/v1/returns/{rma}").json()
    assert status["state"] == "completed", status
    assert [t["state"] for t in status["timeline"]] == ["requested", "authorized", "received", "completed"]
    types = [e["type"] for e in receiver.events() if e["rma_number"] == rma]
    deadline = time.monotonic() + 30
    while len(types) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        types = [e["type"] for e in receiver.events() if e["rma_number"] == rma]
    assert types == ["return.authorized", "return.received", "return.completed"]
    for header, body in receiver.got:
        assert verify(SECRET["webhook"], header, body, now=int(time.time()))
    shown = served.pipeline.webhooks()[0]
    assert shown["deliveries"].get("sent", 0) == len(receiver.got) and shown["latest"][0]["status"] == "sent"


def test_a_stripe_refund_event_completes_a_pending_return_through_a_run_of_its_deployment(
        served: Served, stripe: tuple[FakeStripe, str]) -> None:
    fake, now = stripe[0], datetime.now(UTC)
    charge = fake.add_payment(5000, refund_status="pending")
    served.pipeline.import_data(parse(ImportIn, {
        "products": [{"sku": "HOOK-SERUM", "name": "Serum", "kind": "skincare", "size": "retail", "price": "50.00"}],
        "customers": [{"account": "ACC-HOOK", "name": "Hook Tester", "email": "hook@example.com", "address": {
            "line1": "1 A St", "city": "Lantana", "region": "FL", "postal_code": "33462", "country": "US"}}],
        "orders": [{"number": "HOOK-S1", "account": "ACC-HOOK", "channel": "direct",
                    "placed_at": (now - timedelta(days=6)).isoformat(),
                    "delivered_at": (now - timedelta(days=3)).isoformat(),
                    "lines": [{"sku": "HOOK-SERUM", "quantity": 1, "unit_price": "50.00", "unit_tax": "0.00",
                               "expires_on": "2029-01-31"}],
                    "payments": [{"method": "visa", "amount": "50.00", "last4": "4242", "provider": "stripe",
                                  "reference": charge.intent,
                                  "captured_at": (now - timedelta(days=6)).isoformat()}]}]}))
    r = served.api.post("/v1/returns", headers={"Idempotency-Key": "served-hook"}, json={
        "order_number": "HOOK-S1", "email": "hook@example.com", "reason": "unwanted",
        "lines": [{"sku": "HOOK-SERUM", "quantity": 1}]})
    assert r.status_code == 201 and r.json()["decision"] == "authorized", r.text
    rma = r.json()["rma_number"]
    ThroughPrefect(served.prefect, served.pipeline).receive(parse(ReceiptIn, {
        "rma": rma, "received_at": datetime.now(UTC).isoformat(), "by": "dock",
        "lines": [{"sku": "HOOK-SERUM", "unopened": 1}]}))
    assert served.api.get(f"/v1/returns/{rma}").json()["state"] == "processing"
    [refund] = fake.refunds.values()
    fake.settle(refund["id"], "succeeded")
    body = stripe_refund_event("evt_served_1", dict(fake.refunds[refund["id"]]))
    for duplicate in (False, True):
        answer = served.api.post("/v1/providers/stripe/webhook", content=body, headers={
            "Stripe-Signature": stripe_signature(body, STRIPE_WEBHOOK_SECRET), "Authorization": ""})
        assert answer.json() == {"received": True, "duplicate": duplicate}, answer.text
    deadline = time.monotonic() + 90
    while (state := served.api.get(f"/v1/returns/{rma}").json()["state"]) != "completed":
        assert time.monotonic() < deadline, f"still {state} 90 s after Stripe's event"
        time.sleep(0.3)
    assert [run["name"] for run in flow_runs(served)].count(f"process-{rma}") == 1
    assert len(fake.creates("/v1/refunds")) == 1


def test_no_email_address_in_any_prefect_object(served: Served) -> None:
    served.ask("IS-1002", "served-1002")  # at least one more request, so there is something to look at
    call = served.prefect._call
    runs = flow_runs(served)
    assert runs
    objects = {
        "flow runs": runs,
        "task runs": call("POST", "/task_runs/filter", json={"limit": 200}).json(),
        "logs": call("POST", "/logs/filter", json={"limit": 200}).json(),
        "artifacts": call("POST", "/artifacts/filter", json={"limit": 200}).json(),
        "events": events(served),
        "deployments": call("POST", "/deployments/filter", json={"limit": 50}).json(),
    }
    for what, found in objects.items():
        dumped = json.dumps(found).lower()
        leaked = sorted(e for e in EMAILS if e.lower() in dumped)
        assert not leaked, f"{what} carry {leaked}"
        assert "@example.com" not in dumped, what


def test_sigterm_stops_the_api_the_worker_and_the_prefect_server(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=60) in (0, 128 + signal.SIGTERM, -signal.SIGTERM)
    for port in served.ports:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)


def _as_a_background_job() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def flow_runs(served: Served) -> list[dict[str, Any]]:
    r = served.prefect._call("POST", "/flow_runs/filter", json={"limit": 200})
    assert r.status_code == 200, r.text
    return list(r.json())


def events(served: Served) -> list[dict[str, Any]]:
    since = datetime(2000, 1, 1, tzinfo=UTC).isoformat()
    r = served.prefect._call("POST", "/events/filter", json={"filter": {"occurred": {"since": since}}, "limit": 50})
    found: list[dict[str, Any]] = []
    for _ in range(40):  # the API pages events 50 at a time
        assert r.status_code == 200, r.text
        found += r.json()["events"]
        if not r.json().get("next_page"):
            break
        r = httpx.get(r.json()["next_page"], timeout=30)
    assert found
    return found
