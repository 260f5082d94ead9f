"""The stage flows under Prefect's engine: one session-scoped `prefect_test_harness`, heartbeats off, and a fresh
SQLite returns database per test with the sample catalogue moved to today (the flows read the real clock).

What the engine adds over the service tests: the audit rows carry the flow run id, each stage is a task run that
Prefect retries only on transient errors (and a retried side effect still happens once), every return has its
artifact and events, and the flow runs are named after the order or the RMA.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import func, select

import adapters.config
import models.tables  # noqa: F401  (registers every table on the metadata)
import tasks.returns as tr
from adapters.db import engine_for, unit_of_work, upgrade
from adapters.label.layout import label_path
from entrypoints.demo import DUE_SOON_AFTER_RECEIPT, shifted_catalog
from flows import returns as f
from models.errors import PermanentError, TransientError
from models.schemas import ImportIn, parse
from models.tables import GatewaySettlement, OutboxMessage, Payment, Refund, Return, Transition
from service.results import Decided
from service.steps import Pipeline
from tests.helpers import row_counts

pytestmark = pytest.mark.prefect

SAMPLE = Path(__file__).resolve().parent.parent / "sample"
REQUESTS: dict[str, dict[str, Any]] = {
    s["request"]["order_number"]: s["request"] for s in json.loads((SAMPLE / "requests.json").read_text("utf-8"))
}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _clear_caches() -> None:
    adapters.config.settings.cache_clear()
    tr.pipeline.cache_clear()


@pytest.fixture
def shop(prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pipeline]:
    """The pipeline the tasks use (tasks.returns.pipeline()): a fresh SQLite database, the sample moved to now."""
    url = f"sqlite:///{tmp_path / 'returns.db'}"
    monkeypatch.setenv("RETURNS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RETURNS_DATABASE_URL", url)
    monkeypatch.delenv("RETURNS_SMTP_URL", raising=False)
    _clear_caches()
    upgrade(url)
    p = tr.pipeline()
    assert p.settings.home == tmp_path / "home" and p.settings.database_url == url
    p.import_data(parse(ImportIn, shifted_catalog(datetime.now(UTC))))
    yield p
    _clear_caches()
    engine_for(url).dispose()


# ---- helpers ---------------------------------------------------------------------------------------------------


def request(order: str, **changes: Any) -> dict[str, Any]:
    return REQUESTS[order] | changes


def run(flow: Any, **params: Any) -> tuple[Any, UUID]:
    """Call a flow through the engine; its final state and its flow run id (failures are returned, not raised)."""
    state = flow(**params, return_state=True)
    return state, state.state_details.flow_run_id


def receive(rma: str, lines: list[dict[str, Any]]) -> tuple[Any, UUID]:
    return run(f.record_receipt, rma=rma, received_at=datetime.now(UTC), lines=lines, by="lantana-dock")


def count(p: Pipeline, table: Any) -> int:
    with unit_of_work(p.engine) as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def outbox(p: Pipeline, rma: str) -> list[tuple[str, str, str]]:
    """(kind, status, recipient) of the return's emails, oldest first."""
    with unit_of_work(p.engine) as s:
        ret = s.scalars(select(Return).where(Return.rma == rma)).one()
        return [(m.kind, m.status, m.recipient) for m in
                s.scalars(select(OutboxMessage).where(OutboxMessage.return_id == ret.id).order_by(OutboxMessage.id))]


def audit(p: Pipeline, rma: str) -> list[tuple[str | None, str, str, str | None]]:
    with unit_of_work(p.engine) as s:
        ret = s.scalars(select(Return).where(Return.rma == rma)).one()
        return [(t.from_state, t.to_state, t.actor, t.flow_run_id) for t in
                s.scalars(select(Transition).where(Transition.return_id == ret.id).order_by(Transition.id))]


def mail_files(p: Pipeline) -> list[Path]:
    return sorted(p.settings.mail_dir.glob("*.eml"))


def eventually(probe: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll until `probe()` is truthy: task run states and events reach the API through background workers."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got or time.monotonic() > deadline:
            assert got, f"timed out waiting for {what}"
            return got
        time.sleep(0.1)


def task_runs(flow_run_id: UUID) -> dict[str, Any]:
    """The flow run's task runs by task name ('pay-refund'), once every one of them has finished."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def probe() -> dict[str, Any] | None:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if not runs or any(r.state is None or r.state.type.value not in FINAL for r in runs):
            return None
        names = [r.name.rsplit("-", 1)[0] for r in runs]  # "pay-refund-8ef" -> "pay-refund"
        assert len(names) == len(set(names)), f"a task ran twice as separate task runs: {sorted(names)}"
        return dict(zip(names, runs, strict=True))

    return eventually(probe, f"the task runs of {flow_run_id}")


def flow_run(flow_run_id: UUID) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def artifact(key: str) -> Any:
    """The latest version of the artifact under `key`, or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[0] if found else None


def events_about(rma: str, expected: set[str]) -> list[str]:
    """The names of the events about resource returns.rma.<RMA>, once `expected` are all among them."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter

    def probe() -> list[str] | None:
        with get_client(sync_client=True) as client:
            # The server caps a page at 50; the client's default of 100 is refused with 422.
            page = client.read_events(EventFilter(resource=EventResourceFilter(id=[f"returns.rma.{rma}"])), limit=50)
        names = [e.event for e in page.events]
        return names if expected <= set(names) else None

    return eventually(probe, f"events {sorted(expected)} about {rma}")


class FlakyGateway:
    """Settles through the real ledger, then times out on the first `failures` calls (the reply is lost)."""

    def __init__(self, inner: Any, failures: int, error: Exception | None = None) -> None:
        self.inner, self.failures, self.calls = inner, failures, 0
        self.error = error or TransientError("gateway timeout after the refund was taken")

    def refund(self, **kwargs: Any) -> str:
        self.calls += 1
        reference: str = self.inner.refund(**kwargs)
        if self.calls <= self.failures:
            raise self.error
        return reference


@pytest.fixture
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flows' retrying tasks with the same policy but no backoff, so a test that retries stays fast."""
    for name in ("store_decision", "record_receipt", "pay_refund", "complete_return"):
        task = getattr(tr, name)
        quick = task.with_options(retry_delay_seconds=0, retry_jitter_factor=None)
        assert quick.retries == 4 and quick.retry_condition_fn is tr.transient_only
        monkeypatch.setattr(tr, name, quick)


# ---- request -----------------------------------------------------------------------------------------------------


def test_an_authorized_request_issues_the_rma_label_email_artifact_and_events(shop: Pipeline) -> None:
    state, run_id = run(f.request_return, **request("IS-1001"))
    assert state.is_completed(), state.message
    out = state.result()
    assert out["decision"] == out["state"] == "authorized" and out["refund_total"] == "72.76"
    rma = out["rma_number"]
    assert label_path(shop.settings.label_dir, rma).stat().st_size > 1000
    assert outbox(shop, rma) == [("rma_issued", "sent", "zoe.lukasiewicz@example.com")]
    assert len(mail_files(shop)) == 1
    assert rma in mail_files(shop)[0].read_text("utf-8")
    # The audit rows carry the flow run that made them (DESIGN: "the Prefect flow-run id").
    assert audit(shop, rma) == [(None, "requested", "api", str(run_id)),
                                ("requested", "authorized", "api", str(run_id))]

    assert flow_run(run_id).name == "request-IS-1001"  # the order, never the email address
    runs = task_runs(run_id)
    assert set(runs) == {"store-decision", "render-label", "notify"}
    assert {name: (r.state.type.value, r.run_count) for name, r in runs.items()} == {
        name: ("COMPLETED", 1) for name in runs}

    art = artifact(f"return-{rma.lower()}")
    assert art is not None and art.type == "markdown"
    assert f"# {rma} - authorized" in art.data and "IS-1001" in art.data
    assert "@" not in art.data and "@" not in (art.description or ""), "the artifact shows ids, not emails"
    assert events_about(rma, {"returns.requested", "returns.authorized"})


def test_a_stage_run_never_asks_the_server_for_result_storage(shop: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    # Results are never persisted; without a storage named on the flows Prefect's engine asks the server for its
    # default twice per run (GET /admin/storage), a cost on every stage of every return.
    from prefect.client.orchestration import PrefectClient, SyncPrefectClient

    asked: list[str] = []
    for cls in (PrefectClient, SyncPrefectClient):
        read = cls.read_server_default_result_storage
        monkeypatch.setattr(cls, "read_server_default_result_storage",
                            lambda self, _read=read, _name=cls.__name__: asked.append(_name) or _read(self))
    state, _ = run(f.request_return, **request("IS-1001"))
    assert state.is_completed(), state.message
    received, _ = receive(state.result()["rma_number"], [])
    assert received.is_completed(), received.message
    assert asked == []
    assert all(fl.persist_result is False for fl in (f.request_return, f.record_receipt, f.process_return))


def test_a_declined_request_sends_its_email_and_issues_no_rma(shop: Pipeline) -> None:
    state, _ = run(f.request_return, **request("IS-1003"))
    assert state.is_completed()
    out = state.result()
    assert (out["decision"], out["state"], out["rma_number"]) == ("declined", "declined", None)
    assert out["clauses"][0] == "P1"
    assert not shop.settings.label_dir.exists() or not list(shop.settings.label_dir.iterdir())
    assert shop.outbox_counts() == {"pending": 0, "sent": 1, "failed": 0}
    assert len(mail_files(shop)) == 1


def test_a_review_request_tells_customer_care_and_waits(shop: Pipeline) -> None:
    state, _ = run(f.request_return, **request("IS-1006"))
    out = state.result()
    assert out["state"] == "review"
    rma = out["rma_number"]
    assert not label_path(shop.settings.label_dir, rma).exists()  # no label before an operator authorizes
    assert outbox(shop, rma) == [("review_needed", "sent", shop.settings.care_address)]
    assert "# " + rma + " - review" in artifact(f"return-{rma.lower()}").data
    assert events_about(rma, {"returns.requested", "returns.review"})


def test_the_same_request_run_twice_makes_one_return(shop: Pipeline) -> None:
    first = run(f.request_return, **request("IS-1001"))[0].result()
    before = row_counts(shop)
    again = run(f.request_return, **request("IS-1001"))[0].result()
    assert again == first
    assert row_counts(shop) == before
    assert len(mail_files(shop)) == 1


def test_a_parameter_of_the_wrong_type_fails_before_any_task(shop: Pipeline) -> None:
    before = row_counts(shop)
    state, run_id = run(f.request_return, **request("IS-1001", reason="changed my mind"))
    assert state.is_failed()
    assert row_counts(shop) == before
    assert flow_run(run_id).state.type.value == "FAILED"


# ---- receipt, processing ------------------------------------------------------------------------------------------


def test_a_receipt_completes_the_return_with_its_refund(shop: Pipeline) -> None:
    rma = run(f.request_return, **request("IS-1001"))[0].result()["rma_number"]
    state, run_id = receive(rma, [{"sku": "VC-SERUM-30", "unopened": 1}])
    assert state.is_completed(), state.message
    out = state.result()
    assert (out["state"], out["refund_total"]) == ("completed", "72.76")
    assert flow_run(run_id).name == f"receipt-{rma}"
    assert count(shop, Refund) == 1 and count(shop, GatewaySettlement) == 1
    with unit_of_work(shop.engine) as s:
        assert [(p.method, p.refunded_cents) for p in s.scalars(select(Payment).where(
            Payment.order_number == "IS-1001"))] == [("visa", 7276)]
    assert outbox(shop, rma) == [("rma_issued", "sent", "zoe.lukasiewicz@example.com"),
                                 ("received", "sent", "zoe.lukasiewicz@example.com"),
                                 ("processed", "sent", "zoe.lukasiewicz@example.com")]
    assert len(mail_files(shop)) == 3
    assert [(a, b, who) for a, b, who, _ in audit(shop, rma)][2:] == [
        ("authorized", "received", "operator:lantana-dock"), ("received", "processing", "operator:lantana-dock"),
        ("processing", "completed", "operator:lantana-dock")]
    assert {r for *_, r in audit(shop, rma)[2:]} == {str(run_id)}  # received, processing, completed
    assert set(task_runs(run_id)) == {"record-receipt", "pay-refund", "complete-return", "notify"}
    art = artifact(f"return-{rma.lower()}")
    assert f"# {rma} - completed" in art.data and "$72.76" in art.data
    assert "(None)" not in art.data  # a closed return has a deadline but no deadline flag
    assert events_about(rma, {"returns.received", "returns.processing", "returns.completed"})


def test_process_return_leaves_a_return_that_has_not_arrived_alone(shop: Pipeline) -> None:
    rma = run(f.request_return, **request("IS-1001"))[0].result()["rma_number"]
    before = row_counts(shop)
    state, _ = run(f.process_return, rma=rma)
    assert state.is_completed() and state.result() is None
    assert row_counts(shop) == before


def test_cancel_withdraws_an_authorized_return(shop: Pipeline) -> None:
    rma = run(f.request_return, **request("IS-1001"))[0].result()["rma_number"]
    state, run_id = run(f.cancel_return, rma=rma, note="customer changed their mind", by="alice")
    assert state.result()["state"] == "cancelled"
    assert flow_run(run_id).name == f"cancel-{rma}"
    assert audit(shop, rma)[-1][:3] == ("authorized", "cancelled", "operator:alice")
    assert events_about(rma, {"returns.cancelled"})


# ---- sweeps ------------------------------------------------------------------------------------------------------


def test_the_sweep_expires_an_rma_nobody_shipped(shop: Pipeline) -> None:
    asked = datetime.now(UTC)
    rma = run(f.request_return, **request("IS-1008"))[0].result()["rma_number"]
    early = run(f.deadline_sweep, as_of=asked + timedelta(days=29))[0].result()
    assert early["expired"] == [] and shop.board(asked + timedelta(days=29)).counts == {"authorized": 1}
    state, run_id = run(f.deadline_sweep, as_of=asked + timedelta(days=31))
    swept = state.result()
    assert swept["expired"] == [rma]
    assert shop.board(asked + timedelta(days=31)).counts == {"expired": 1}
    assert flow_run(run_id).name == "sweep"
    assert audit(shop, rma)[-1][:3] == ("authorized", "expired", "sweep")
    assert [k for k, status, _ in outbox(shop, rma)] == ["rma_issued", "expired"]
    assert shop.outbox_counts()["pending"] == 0
    assert "# " + rma + " - expired" in artifact(f"return-{rma.lower()}").data
    assert events_about(rma, {"returns.expired"})
    board = artifact("returns-board")
    assert board is not None and "| expired | 1 |" in board.data
    assert run(f.deadline_sweep, as_of=asked + timedelta(days=32))[0].result()["expired"] == []


def test_the_sweep_escalates_a_return_in_review_once_due_soon_and_once_overdue(shop: Pipeline) -> None:
    rma = run(f.request_return, **request("IS-1011"))[0].result()["rma_number"]
    received_at = datetime.now(UTC)
    state, _ = run(f.record_receipt, rma=rma, received_at=received_at, by="lantana-dock",
                   lines=[{"sku": "AG-RET-SRM", "damaged": 1}, {"sku": "IL-FIRM-MASK", "unopened": 1}])
    assert state.result()["state"] == "review"  # damaged in transit back (R12): an operator decides
    assert count(shop, GatewaySettlement) == 0
    deadline = received_at + timedelta(days=10)

    soon = run(f.deadline_sweep, as_of=received_at + DUE_SOON_AFTER_RECEIPT)[0].result()
    assert (soon["due_soon"], soon["overdue"]) == ([rma], [])
    assert shop.board(received_at + DUE_SOON_AFTER_RECEIPT).due_soon == [rma]
    assert run(f.deadline_sweep, as_of=received_at + DUE_SOON_AFTER_RECEIPT)[0].result()["due_soon"] == []
    late = run(f.deadline_sweep, as_of=deadline + timedelta(hours=1))[0].result()
    assert (late["due_soon"], late["overdue"]) == ([], [rma])
    assert "## Overdue (R9: past the 10-day deadline): 1" in artifact("returns-board").data
    care = shop.settings.care_address
    assert [(k, r) for k, _, r in outbox(shop, rma) if k in {"due_soon", "overdue"}] == [
        ("due_soon", care), ("overdue", care)]
    assert shop.outbox_counts() == {"pending": 0, "sent": 5, "failed": 0}  # issued, received, review, soon, late
    assert audit(shop, rma)[-1][1] == "review"  # escalation is a flag and an email, not a state


# ---- reviews -----------------------------------------------------------------------------------------------------


def test_a_review_before_receipt_authorized_issues_the_rma_and_label(shop: Pipeline) -> None:
    rma = run(f.request_return, **request("IS-1006"))[0].result()["rma_number"]
    state, run_id = run(f.settle_review, rma=rma, decision="authorize", reason="expiry_checked", note="lot checked",
                        by="alice")
    assert state.result() == {"rma_number": rma, "state": "authorized", "deadline": None}
    assert flow_run(run_id).name == f"review-{rma}"
    assert label_path(shop.settings.label_dir, rma).exists()
    assert [k for k, *_ in outbox(shop, rma)] == ["review_needed", "rma_issued"]
    assert shop.outbox_counts()["pending"] == 0
    assert audit(shop, rma)[-1][:3] == ("review", "authorized", "operator:alice")
    assert events_about(rma, {"returns.review", "returns.authorized"})


def test_a_review_before_receipt_declined_sends_the_declined_email(shop: Pipeline) -> None:
    rma = run(f.request_return, **request("IS-1006"))[0].result()["rma_number"]
    declined = run(f.settle_review, rma=rma, decision="decline", reason="not_eligible", note="lot expired", by="alice")
    assert declined[0].result()["state"] == "declined"
    assert not label_path(shop.settings.label_dir, rma).exists()
    assert [k for k, *_ in outbox(shop, rma)] == ["review_needed", "declined"]
    assert events_about(rma, {"returns.declined"})


def test_a_review_after_receipt_authorized_pays_the_damaged_unit_too(shop: Pipeline) -> None:
    rma = run(f.request_return, **request("IS-1011"))[0].result()["rma_number"]
    receive(rma, [{"sku": "AG-RET-SRM", "damaged": 1}, {"sku": "IL-FIRM-MASK", "unopened": 1}])
    state, run_id = run(f.settle_review, rma=rma, decision="authorize", reason="damage_confirmed",
                        note="carrier damage", by="alice")
    out = state.result()
    assert (out["state"], out["refund_total"]) == ("completed", "132.68")
    assert count(shop, GatewaySettlement) == 1 and count(shop, Refund) == 1
    assert [(a, b, who) for a, b, who, _ in audit(shop, rma)][-2:] == [
        ("review", "processing", "operator:alice"), ("processing", "completed", "operator:alice")]
    assert set(task_runs(run_id)) == {"settle-review", "pay-refund", "complete-return", "notify"}
    assert [k for k, *_ in outbox(shop, rma)][-1] == "processed"


def test_settling_a_return_that_is_not_in_review_fails_and_changes_nothing(shop: Pipeline) -> None:
    rma = run(f.request_return, **request("IS-1001"))[0].result()["rma_number"]
    before = row_counts(shop)
    state, run_id = run(f.settle_review, rma=rma, decision="authorize", reason="other", note="twice", by="alice")
    assert state.is_failed() and "not in review" in state.message
    assert task_runs(run_id)["settle-review"].run_count == 1
    assert row_counts(shop) == before


@pytest.mark.parametrize("stage", ["receipt", "review", "cancel", "expire"])
def test_every_audit_row_carries_the_flow_run_that_made_it(shop: Pipeline, stage: str) -> None:
    order = {"receipt": "IS-1001", "review": "IS-1006", "cancel": "IS-1001", "expire": "IS-1008"}[stage]
    rma = run(f.request_return, **request(order))[0].result()["rma_number"]
    if stage == "receipt":
        state, run_id = receive(rma, [{"sku": "VC-SERUM-30", "unopened": 1}])
        row = audit(shop, rma)[2]  # authorized -> received
    elif stage == "review":
        state, run_id = run(f.settle_review, rma=rma, decision="authorize", reason="other", note="checked", by="alice")
        row = audit(shop, rma)[-1]
    elif stage == "cancel":
        state, run_id = run(f.cancel_return, rma=rma, note="withdrawn", by="alice")
        row = audit(shop, rma)[-1]
    else:
        state, run_id = run(f.deadline_sweep, as_of=datetime.now(UTC) + timedelta(days=31))
        row = audit(shop, rma)[-1]
    assert state.is_completed(), state.message
    assert row[3] == str(run_id), f"{row[0]} -> {row[1]} by {row[2]} has flow_run_id {row[3]}"


# ---- retries: transient errors are retried, their side effects happen once; permanent ones are not -------------


def test_a_gateway_that_times_out_twice_is_retried_and_pays_once(
    shop: Pipeline, no_retry_delay: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    rma = run(f.request_return, **request("IS-1001"))[0].result()["rma_number"]
    gateway = FlakyGateway(shop.gateway, failures=2)
    monkeypatch.setattr(shop, "gateway", gateway)
    state, run_id = receive(rma, [{"sku": "VC-SERUM-30", "unopened": 1}])
    assert state.is_completed(), state.message
    assert state.result()["state"] == "completed"
    assert gateway.calls == 3
    runs = task_runs(run_id)
    assert (runs["pay-refund"].run_count, runs["pay-refund"].state.type.value) == (3, "COMPLETED")
    assert {n: r.run_count for n, r in runs.items() if n != "pay-refund"} == {n: 1 for n in runs if n != "pay-refund"}
    assert count(shop, GatewaySettlement) == 1 and count(shop, Refund) == 1
    with unit_of_work(shop.engine) as s:
        assert s.execute(select(func.sum(GatewaySettlement.amount_cents))).scalar_one() == 7276
        assert s.scalars(select(Payment.refunded_cents).where(Payment.order_number == "IS-1001")).all() == [7276]
    assert [k for k, *_ in outbox(shop, rma)].count("processed") == 1


@pytest.mark.parametrize("order", ["IS-1001", "IS-1004"], ids=["with-idempotency-key", "without-idempotency-key"])
def test_a_request_whose_commit_reply_is_lost_twice_is_retried_into_one_return(
    shop: Pipeline, no_retry_delay: None, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    real = Pipeline.request
    calls: list[str] = []

    def commits_then_times_out(self: Pipeline, *args: Any, **kwargs: Any) -> Decided:
        out = real(self, *args, **kwargs)  # the transaction committed ...
        calls.append(out.state)
        if len(calls) <= 2:  # ... and the connection dropped before the caller heard so
            raise TransientError("database connection lost")
        return out

    monkeypatch.setattr(Pipeline, "request", commits_then_times_out)
    state, run_id = run(f.request_return, **request(order))
    assert state.is_completed(), state.message
    assert state.result()["state"] == "authorized"
    assert task_runs(run_id)["store-decision"].run_count == 3
    assert count(shop, Return) == 1
    rma = state.result()["rma_number"]
    assert [k for k, *_ in outbox(shop, rma)] == ["rma_issued"]
    assert len(mail_files(shop)) == 1


def test_a_request_for_an_item_not_on_the_order_is_not_retried_and_writes_nothing(shop: Pipeline) -> None:
    before = row_counts(shop)
    state, run_id = run(f.request_return, **request("IS-1001", lines=[{"sku": "OR-GEL-POL", "quantity": 1}],
                                                    idempotency_key="bad-1"))
    assert state.is_failed()
    store = task_runs(run_id)["store-decision"]
    assert (store.run_count, store.state.type.value) == (1, "FAILED")
    assert row_counts(shop) == before
    assert not mail_files(shop)


def test_a_receipt_with_wrong_counts_is_not_retried_and_writes_nothing(shop: Pipeline) -> None:
    rma = run(f.request_return, **request("IS-1001"))[0].result()["rma_number"]
    before = row_counts(shop)
    state, run_id = receive(rma, [{"sku": "VC-SERUM-30", "unopened": 2}])
    assert state.is_failed() and "2 units counted" in state.message
    runs = task_runs(run_id)
    assert set(runs) == {"record-receipt"}  # the flow stops at the failed stage
    assert runs["record-receipt"].run_count == 1
    assert row_counts(shop) == before


def test_a_declined_card_is_not_retried_and_pays_nothing(
    shop: Pipeline, no_retry_delay: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    rma = run(f.request_return, **request("IS-1001"))[0].result()["rma_number"]

    class Declines:
        calls = 0

        def refund(self, **kwargs: Any) -> str:
            Declines.calls += 1
            raise PermanentError("card declined the refund")

    monkeypatch.setattr(shop, "gateway", Declines())
    state, run_id = receive(rma, [{"sku": "VC-SERUM-30", "unopened": 1}])
    assert state.is_failed() and "card declined" in state.message
    assert Declines.calls == 1
    assert task_runs(run_id)["pay-refund"].run_count == 1
    assert count(shop, GatewaySettlement) == 0 and count(shop, Refund) == 0
    # The return stays claimed in processing; the sweep re-drives it once the lease lapses.
    assert audit(shop, rma)[-1][1] == "processing"


def test_the_relay_flow_reports_without_personal_data(shop: Pipeline) -> None:
    run(f.request_return, **request("IS-1001"))
    state, run_id = run(f.outbox_relay)
    assert state.is_completed()
    assert state.result()["sent"] == [] and state.result()["failed"] == []  # the request flow already sent it
    assert flow_run(run_id).name == "relay"
    assert "@" not in json.dumps(state.result())
