"""The automations of prefect.yaml against a real `prefect server`: an overdue flag or a failed stage run escalates
its return to Customer Care exactly once, however often the event arrives."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from served import REQUESTS, Shop, open_shop, prefect_with_deployments
from sqlalchemy import select
from sqlmodel import col

from adapters.db import unit_of_work
from entrypoints.prefect_server import deploy_all
from models.schemas import ReceiptIn, ReturnRequestIn, parse
from models.tables import Escalation, OutboxMessage
from service.returns import Actor

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

ESCALATE = "escalate-return/automation"
AUTOMATIONS = {"escalate-overdue-return", "escalate-failed-stage-run"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Shop]]:
    base = tmp_path_factory.mktemp("escalate")
    with prefect_with_deployments(base) as env, open_shop(base / "shop", env) as shop:
        yield env, shop


def authorized(shop: Shop, order: str, received: bool = False) -> str:
    """A sample request stored directly (no Prefect run), received at the dock if asked; its RMA."""
    now = datetime.now(UTC)
    decided = shop.pipeline.request(parse(ReturnRequestIn, REQUESTS[order]), now, Actor("api"))
    assert decided.rma_number and decided.authorized, decided
    if received:
        lines = [{"sku": ln["sku"], "unopened": ln["quantity"], "opened": 0, "damaged": 0, "missing": 0}
                 for ln in REQUESTS[order]["lines"]]
        shop.pipeline.receive(parse(ReceiptIn, {"rma": decided.rma_number, "received_at": now.isoformat(),
                                                "by": "dock", "lines": lines}), now, Actor("operator:dock"))
    return decided.rma_number


def emit_overdue(shop: Shop, rma: str, event_id: uuid.UUID) -> None:
    """`returns.overdue` as tasks/visibility.py publish_return emits it, posted to the server's events API."""
    event = {"id": str(event_id), "occurred": datetime.now(UTC).isoformat(), "event": "returns.overdue",
             "resource": {"prefect.resource.id": f"returns.rma.{rma}", "prefect.resource.name": rma},
             "payload": {"state": "received"}, "related": []}
    r = shop.call("POST", "/events", json=[event])
    assert r.status_code == 204, r.text


def escalation_runs(shop: Shop, rma: str, at_least: int, timeout: float = 90.0) -> list[dict[str, Any]]:
    """The escalation deployment's runs for `rma` once `at_least` of them have finished."""
    deadline = time.monotonic() + timeout
    query = {"deployments": {"id": {"any_": [shop.deployment(ESCALATE)["id"]]}}}
    while True:  # by parameter, not by name: a run not yet started has no templated name
        runs = [r for r in shop.call("POST", "/flow_runs/filter", json=query).json() if r["parameters"]["rma"] == rma]
        done = [r for r in runs if r["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}]
        if len(done) >= at_least or time.monotonic() > deadline:
            assert len(done) >= at_least, f"{len(done)} escalation runs finished for {rma}; see {shop.log}"
            return list(runs)
        time.sleep(0.3)


def escalations(shop: Shop, rma: str) -> list[Escalation]:
    with unit_of_work(shop.pipeline.engine) as s:
        found = list(s.scalars(select(Escalation).where(col(Escalation.rma) == rma)))
        s.expunge_all()
        return found


def care_emails(shop: Shop, rma: str) -> list[OutboxMessage]:
    return_id = shop.pipeline.return_id(rma)
    with unit_of_work(shop.pipeline.engine) as s:
        found = list(s.scalars(select(OutboxMessage).where(col(OutboxMessage.return_id) == return_id,
                                                            col(OutboxMessage.kind) == "escalated")))
        s.expunge_all()
        return found


def automations(shop: Shop) -> list[str]:
    r = shop.call("POST", "/automations/filter", json={})
    assert r.status_code == 200, r.text
    return sorted(a["name"] for a in r.json())


def test_deploying_creates_the_automations_and_deploying_again_does_not_copy_them(
        served: tuple[dict[str, str], Shop], tmp_path: Any) -> None:
    env, shop = served
    assert automations(shop) == sorted(AUTOMATIONS)
    deploy_all(env, tmp_path / "deploy-again.log")
    assert automations(shop) == sorted(AUTOMATIONS)


def test_an_overdue_event_escalates_once_even_when_it_arrives_twice(served: tuple[dict[str, str], Shop]) -> None:
    _, shop = served
    rma = authorized(shop, "IS-1001", received=True)
    same = uuid.uuid4()
    emit_overdue(shop, rma, same)
    emit_overdue(shop, rma, same)  # a redelivery: Prefect drops an event id it has seen
    emit_overdue(shop, rma, uuid.uuid4())  # the flag published again under another id: a second firing
    runs = escalation_runs(shop, rma, at_least=2)
    assert len(runs) == 2 and all(r["state"]["type"] == "COMPLETED" for r in runs), [r["state"] for r in runs]
    assert sorted(r["parameters"]["cause"] for r in runs) == ["returns.overdue"] * 2
    (row,) = escalations(shop, rma)
    assert (row.cause, row.source) == ("returns.overdue", None)
    (mail,) = care_emails(shop, rma)
    assert mail.recipient == shop.pipeline.settings.care_address and mail.status == "sent"
    assert mail.context["rma"] == rma and mail.context["state"] == "received"
    eml = [p.read_text("utf-8") for p in shop.mail() if f"Escalated: {rma}" in p.read_text("utf-8")]
    assert len(eml) == 1 and "passed its processing deadline" in eml[0]
    board = shop.call("POST", "/artifacts/latest/filter",
                      json={"artifacts": {"key": {"any_": ["returns-board"]}}}).json()
    assert board, "the escalation published no board"
    escalated = board[0]["data"].split("## Escalated")[1].split("## ")[0]
    assert f"[{rma}](" in escalated and f"/artifacts/key/return-{rma.lower()})" in escalated


def test_a_failed_stage_run_escalates_its_return_once(served: tuple[dict[str, str], Shop]) -> None:
    _, shop = served
    rma = authorized(shop, "IS-1002")
    # A review of a return that is not in review is refused (one line, nothing changes): the run ends Failed, the
    # automation runs the escalation, which sees a refusal, not a failure, and records nothing.
    created = shop.create("settle-review/operator", {"rma": rma, "decision": "authorize", "reason": "other",
                                                     "note": "ok", "by": "dana"})
    assert created.status_code == 201, created.text
    refused = shop.wait(created.json()["id"])
    assert refused["state"]["type"] == "FAILED" and "InvalidInput:" in refused["state"]["message"]
    (run,) = escalation_runs(shop, rma, at_least=1)
    assert run["state"]["type"] == "COMPLETED" and run["parameters"]["failed_run"] == refused["id"], run["state"]
    assert escalations(shop, rma) == [] and care_emails(shop, rma) == []

    # A stage run that failed for real (its retries spent on a database that was down): escalated, once.
    def fail_for_real(note: str) -> str:
        later = (datetime.now(UTC) + timedelta(days=30)).isoformat()  # the worker leaves it alone meanwhile
        run_id = shop.create("settle-review/operator", {"rma": rma, "decision": "decline", "reason": "other",
                                                        "note": note, "by": "dana"}, start=later).json()["id"]
        r = shop.call("POST", f"/flow_runs/{run_id}/set_state", json={"force": True, "state": {
            "type": "FAILED", "message": "Flow run encountered an exception: TransientError: the returns database "
                                         "is unavailable"}})
        assert r.status_code in (200, 201), r.text
        return str(run_id)

    failed = fail_for_real("first")
    runs = escalation_runs(shop, rma, at_least=2)
    assert [r["state"]["type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    (row,) = escalations(shop, rma)
    assert (row.cause, row.source) == ("prefect.flow-run.Failed", failed)
    (mail,) = care_emails(shop, rma)
    assert mail.status == "sent" and mail.context["flow_run_id"] == failed

    # The same return failing again (another run, another event) is escalated already: nothing new.
    fail_for_real("again")
    escalation_runs(shop, rma, at_least=3)
    assert len(escalations(shop, rma)) == 1 and len(care_emails(shop, rma)) == 1
