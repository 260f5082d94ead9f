"""The fault suite: the real components misbehave under the whole pipeline, and every fault ends either retried to
success or parked where an operator sees it (a failed outbox row with its error, a return in `review`) - never
silently dropped, never paid twice.

- SMTP (a real aiosmtpd server on loopback): 550 -> the row fails visibly; 451 -> pending with backoff, then
  sent; the connection dropped during DATA (before and after the server took the message) -> retried, delivered
  under the same Message-ID; the server down -> rows wait, then go out once it is back.
- SQLite locked by another connection's BEGIN IMMEDIATE while a step runs -> TransientError after the (small, for
  the test) busy timeout, nothing half-written, the step retried to success - including between pay and complete.
- PostgreSQL: the pipeline's backend terminated between steps (pool_pre_ping reconnects) and inside a unit of work
  (TransientError, rolled back, retried).
- The payment gateway times out after it paid: the retry (the task's retry, or the sweep) pays nothing more.

The Prefect task-retry path for the gateway timeout runs in tests/test_flows.py
(test_a_gateway_that_times_out_twice_is_retried_and_pays_once); here the same fault is driven at the Pipeline level.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from email import policy as email_policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.orm import Session

import service.returns as svc
from adapters.config import load_settings
from adapters.db import engine_for, make_engine, unit_of_work, upgrade
from adapters.payments.gateway import LedgerGateway
from models.errors import PermanentError, TransientError
from models.schemas import ReceiptIn, ReturnRequestIn, parse
from models.tables import GatewaySettlement, OutboxMessage, Payment, Refund, Return, Transition
from service.returns import Actor
from service.steps import Pipeline
from tests.conftest import PG_ADMIN_URL, SAMPLE
from tests.crash_driver import receipt_for, request_for, run_op
from tests.helpers import LATER, NOW, finish, process, receive, redrive, review, sweep, tally
from tests.invariants import check_invariants
from tests.smtp_server import SmtpServer

AFTER_LEASE = LATER + timedelta(minutes=16)
CATALOG = json.loads((SAMPLE / "catalog.json").read_text("utf-8"))
ZOE = "zoe.lukasiewicz@example.com"  # IS-1001's account contact
NGO = "ngo.bao.chau@example.com"  # IS-1003's

TALLY = tally("faults")


# ---- a real SMTP server that misbehaves on cue ------------------------------------------------------------------


class Faulty:
    """aiosmtpd handler. `rcpt[address]`: replies to give that recipient, one per attempt (then 250; "550*" sticks).
    `data`: actions for the next DATA commands: "accept", "drop-before" (close before taking the message),
    "drop-after" (take it, then close before the 250 reaches the client)."""

    def __init__(self) -> None:
        self.rcpt: dict[str, list[str]] = {}
        self.data: list[str] = []
        self.accepted: list[bytes] = []
        self.lock = threading.Lock()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        plan = self.rcpt.get(address.lower())
        if plan:
            reply = plan[0] if plan[0].endswith("*") else plan.pop(0)
            return reply.rstrip("*")
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            action = self.data.pop(0) if self.data else "accept"
            if action in ("accept", "drop-after"):
                self.accepted.append(envelope.original_content)
        if action.startswith("drop"):
            server.transport.abort()  # the client sees the connection go, not a reply
            await asyncio.sleep(0)
        return "250 Message accepted for delivery"

    def message_ids(self) -> list[str]:
        with self.lock:
            parse = BytesParser(policy=email_policy.default).parsebytes
            return [str(parse(raw)["Message-ID"]) for raw in self.accepted]


class Smtp(SmtpServer):
    """The fault tests' server: a Faulty handler, and a client timeout short enough to see a hang."""

    def __init__(self) -> None:
        super().__init__(Faulty(), url_query="?timeout=5")


@pytest.fixture
def smtp() -> Iterator[Smtp]:
    srv = Smtp()
    srv.start()
    yield srv
    srv.stop()


def pipeline_at(tmp_path: Path, url: str, smtp_url: str | None = None, engine: Engine | None = None) -> Pipeline:
    upgrade(url)
    env = {"RETURNS_HOME": str(tmp_path / "home"), "RETURNS_DATABASE_URL": url}
    if smtp_url:
        env["RETURNS_SMTP_URL"] = smtp_url
    p = Pipeline(settings=load_settings(env), engine=engine or engine_for(url))
    run_op(p, {"op": "import", "data": CATALOG})
    return p


# ---- what "not silently dropped" means --------------------------------------------------------------------------


def outbox(p: Pipeline) -> list[OutboxMessage]:
    with unit_of_work(p.engine) as s:
        return list(s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def assert_accounted_for(p: Pipeline, delivered: list[str] | None = None) -> None:
    """Every email is sent, or failed with its error recorded, or pending and due again later; every sent one was
    delivered (when `delivered` lists what the server took); every return is at rest or has someone to move it."""
    for m in outbox(p):
        assert m.status in ("sent", "failed", "pending"), m.status
        if m.status == "failed":
            assert m.last_error, f"{m.key} failed with no error recorded"
        if delivered is not None:
            assert (m.message_id in delivered) == (m.status == "sent"), f"{m.key} is {m.status}; delivered: {delivered}"
        TALLY["outbox rows accounted for"] += 1
    TALLY["check_invariants calls"] += 1
    TALLY["invariants.py checks"] += check_invariants(p, settled=False)


def settled(p: Pipeline, mail_dir: Path | None = None) -> None:
    TALLY["check_invariants calls"] += 1
    TALLY["invariants.py checks"] += check_invariants(p, settled=True, mail_dir=mail_dir)
    TALLY["scenarios ended retried to success"] += 1


def one(p: Pipeline, model: Any, *where: Any) -> int:
    with unit_of_work(p.engine) as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def state_of(p: Pipeline, rma: str) -> str:
    with unit_of_work(p.engine) as s:
        return str(s.scalars(select(Return.state).where(Return.rma == rma)).one())


# ---- SMTP ---------------------------------------------------------------------------------------------------------


def test_smtp_550_parks_the_email_failed_and_visible_and_the_rest_go_out(tmp_path: Path, smtp: Smtp) -> None:
    p = pipeline_at(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", smtp.url)
    smtp.handler.rcpt[ZOE] = ["550 5.1.1 <zoe.lukasiewicz@example.com>: Recipient address rejected*"]
    rma = run_op(p, {"op": "request", "order": "IS-1001", "now": NOW.isoformat(), "relay": False})["rma_number"]
    run_op(p, {"op": "request", "order": "IS-1003", "now": NOW.isoformat(), "relay": False})
    report = p.relay(NOW)
    assert len(report.sent) == 1 and len(report.failed) == 1 and report.halted is None
    assert "550" in report.failed[0]["error"] and ZOE not in json.dumps(report.to_json())  # the reason, not the address
    assert p.outbox_counts() == {"pending": 0, "sent": 1, "failed": 1}
    assert [m["status"] for m in p.show(rma, NOW)["emails"]] == ["failed"]  # the operator's view shows it
    assert p.relay(NOW + timedelta(days=1)).sent == []  # parked: not retried into the void, not deleted
    assert_accounted_for(p, smtp.handler.message_ids())
    TALLY["scenarios parked visibly"] += 1


def test_smtp_451_waits_out_its_backoff_then_is_sent_once(tmp_path: Path, smtp: Smtp) -> None:
    p = pipeline_at(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", smtp.url)
    smtp.handler.rcpt[ZOE] = ["451 4.3.0 Mailbox busy, try again later"]
    run_op(p, {"op": "request", "order": "IS-1001", "now": NOW.isoformat(), "relay": False})
    report = p.relay(NOW)
    assert report.sent == [] and len(report.deferred) == 1 and "451" in report.deferred[0]["error"]
    (row,) = outbox(p)
    assert (row.status, row.attempts) == ("pending", 1) and row.next_attempt_at > NOW
    assert_accounted_for(p, smtp.handler.message_ids())
    assert p.relay(row.next_attempt_at - timedelta(seconds=1)).sent == []  # not before its backoff
    assert len(p.relay(row.next_attempt_at).sent) == 1
    assert smtp.handler.message_ids() == [row.message_id]
    assert_accounted_for(p, smtp.handler.message_ids())
    settled(p)


@pytest.mark.parametrize("when", ["drop-before", "drop-after"])
def test_smtp_connection_dropped_during_data_is_resent_under_the_same_message_id(tmp_path: Path, smtp: Smtp,
                                                                                 when: str) -> None:
    """drop-before: the server never took it; drop-after: it did, but the 250 was lost - the resend duplicates it
    at the server under the same Message-ID (at-least-once, and a reader's client folds the two)."""
    p = pipeline_at(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", smtp.url)
    smtp.handler.data = [when]
    run_op(p, {"op": "request", "order": "IS-1001", "now": NOW.isoformat(), "relay": False})
    run_op(p, {"op": "request", "order": "IS-1003", "now": NOW.isoformat(), "relay": False})
    report = p.relay(NOW)
    assert len(report.deferred) == 1 and "connection lost" in report.deferred[0]["error"]
    assert len(report.sent) == 1  # a dropped connection is this message's problem, not the server's: go on
    dropped = next(m for m in outbox(p) if m.status == "pending")
    assert dropped.attempts == 1
    later = p.relay(dropped.next_attempt_at)
    assert len(later.sent) == 1
    ids = smtp.handler.message_ids()
    assert ids.count(dropped.message_id) == (2 if when == "drop-after" else 1)
    assert len(set(ids)) == 2 and all(m.status == "sent" for m in outbox(p))
    assert_accounted_for(p, ids)
    settled(p)


def test_smtp_down_then_back_sends_everything_once(tmp_path: Path) -> None:
    srv = Smtp()  # nothing listens on its port yet: connection refused
    p = pipeline_at(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", srv.url)
    for order in ("IS-1001", "IS-1003", "IS-1006"):
        run_op(p, {"op": "request", "order": order, "now": NOW.isoformat(), "relay": False})
    report = p.relay(NOW)
    assert report.sent == [] and report.failed == [] and "unreachable" in (report.halted or "")
    assert p.outbox_counts() == {"pending": 3, "sent": 0, "failed": 0}
    assert_accounted_for(p, [])
    srv.start()
    try:
        p.relay(NOW + timedelta(hours=2))  # past the first row's backoff
        assert p.outbox_counts() == {"pending": 0, "sent": 3, "failed": 0}
        ids = srv.handler.message_ids()
        assert sorted(ids) == sorted(m.message_id for m in outbox(p))  # each once
        assert_accounted_for(p, ids)
        settled(p)
    finally:
        srv.stop()


# ---- SQLite locked --------------------------------------------------------------------------------------------


def impatient_sqlite(url: str, busy_ms: int = 200) -> Engine:
    """The production SQLite engine with a short busy timeout, so a held lock fails fast instead of after 30 s."""
    engine = make_engine(url)

    @event.listens_for(engine, "connect")
    def _short_busy(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.execute(f"PRAGMA busy_timeout={busy_ms}")

    return engine


class Locked:
    """Another process's writer: holds SQLite's write lock (BEGIN IMMEDIATE) until released."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=5)
        self.conn.execute("BEGIN IMMEDIATE")

    def __enter__(self) -> Locked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def table_counts(p: Pipeline) -> dict[str, int]:
    with unit_of_work(p.engine) as s:
        return {m.__tablename__: int(s.scalar(select(func.count()).select_from(m)) or 0)  # type: ignore[attr-defined]
                for m in (Return, Transition, OutboxMessage, Refund, GatewaySettlement)}


def test_sqlite_locked_during_each_step_is_transient_writes_nothing_and_retries_to_success(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    upgrade(f"sqlite:///{path}")
    p = pipeline_at(tmp_path, f"sqlite:///{path}", engine=impatient_sqlite(f"sqlite:///{path}"))
    mail = p.settings.home / "mail"

    def under_lock(step: Any) -> Any:
        before = table_counts(p)
        with Locked(path), pytest.raises(TransientError, match="database unavailable or busy"):
            step()
        assert table_counts(p) == before, "a step that failed on the lock left rows behind"
        TALLY["locked steps (TransientError, nothing written)"] += 1
        return step()  # the retry, lock released

    out = under_lock(lambda: p.request(request_for("IS-1002"), NOW, Actor("api")))
    rma = out.rma_number
    under_lock(lambda: p.render_label(rma))
    under_lock(lambda: receive(p, receipt_for(rma, [{"sku": "PV-SPF50-91", "unopened": 2}], LATER.isoformat()), LATER))
    assert under_lock(lambda: p.claim(rma, LATER, Actor("api"))) is True
    plan = under_lock(lambda: p.plan_refund(rma))
    refs = under_lock(lambda: p.pay(plan))  # the gateway's own transaction is locked out too: nothing paid
    assert one(p, GatewaySettlement) == 2
    under_lock(lambda: p.complete(refs, LATER, Actor("api")))
    under_lock(lambda: p.relay(LATER))
    assert state_of(p, rma) == "completed" and one(p, Refund) == 1 and one(p, GatewaySettlement) == 2
    assert_accounted_for(p)
    settled(p, mail)


def test_sqlite_locked_between_pay_and_complete_then_finished_by_the_sweep(tmp_path: Path) -> None:
    """The worst moment for a lock: the gateway paid, our commit is refused. The return stays processing with its
    lease; the sweep re-drives it and the gateway, asked again under the same keys, pays nothing more."""
    path = tmp_path / "r.db"
    upgrade(f"sqlite:///{path}")
    p = pipeline_at(tmp_path, f"sqlite:///{path}", engine=impatient_sqlite(f"sqlite:///{path}"))
    rma = run_op(p, {"op": "request", "order": "IS-1002", "now": NOW.isoformat()})["rma_number"]
    run_op(p, {"op": "receive", "rma": rma, "lines": [{"sku": "PV-SPF50-91", "unopened": 2}], "now": LATER.isoformat(),
               "process": False})
    assert p.claim(rma, LATER, Actor("api"))
    plan = p.plan_refund(rma)
    refs = p.pay(plan)
    with Locked(path), pytest.raises(TransientError):
        p.complete(refs, LATER, Actor("api"))
    assert state_of(p, rma) == "processing" and one(p, Refund) == 0 and one(p, GatewaySettlement) == 2
    assert_accounted_for(p)
    done = sweep(p, AFTER_LEASE)
    assert done.processed == [rma]
    p.relay(AFTER_LEASE)
    assert one(p, GatewaySettlement) == 2 and one(p, Refund) == 1
    settled(p, p.settings.home / "mail")


# ---- PostgreSQL connection lost ---------------------------------------------------------------------------------


@pytest.fixture
def pg_app(pg_url: str) -> Iterator[tuple[str, str]]:
    """The test schema's URL tagged with an application_name of its own, so only this pipeline's backends are
    terminated (other suites may share the server)."""
    name = f"faults-{uuid.uuid4().hex[:10]}"
    url = f"{pg_url}&application_name={name}"
    yield url, name
    engine_for(url).dispose()


def terminate(name: str, pid: int | None = None) -> int:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            rows = conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :n"
                + (" AND pid = :pid" if pid else "")), {"n": name, "pid": pid}).all()
        return len(rows)
    finally:
        admin.dispose()


def backend_pids(p: Pipeline) -> set[int]:
    with unit_of_work(p.engine) as s:
        return {int(s.scalar(text("SELECT pg_backend_pid()")) or 0)}


@pytest.mark.postgres
def test_postgres_backend_terminated_between_steps_reconnects(tmp_path: Path, pg_app: tuple[str, str]) -> None:
    url, name = pg_app
    p = pipeline_at(tmp_path, url)
    rma = run_op(p, {"op": "request", "order": "IS-1002", "now": NOW.isoformat()})["rma_number"]
    before = backend_pids(p)
    assert terminate(name) >= 1  # every pooled connection of this pipeline is now dead
    TALLY["postgres backends terminated"] += 1
    # the next unit of work: pool_pre_ping notices the dead connection and opens a new one
    out = run_op(p, {"op": "receive", "rma": rma, "lines": [{"sku": "PV-SPF50-91", "unopened": 2}],
                     "now": LATER.isoformat()})
    assert out["state"] == "completed" and backend_pids(p).isdisjoint(before)
    assert one(p, GatewaySettlement) == 2 and one(p, Refund) == 1
    assert_accounted_for(p)
    settled(p, p.settings.home / "mail")


@pytest.mark.postgres
def test_postgres_backend_terminated_inside_the_completing_transaction(tmp_path: Path, pg_app: tuple[str, str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection dies after the gateway paid, inside the transaction that records it: TransientError, nothing
    recorded; the task's retry (complete again) records it once, and the gateway was paid once."""
    url, name = pg_app
    p = pipeline_at(tmp_path, url)
    rma = run_op(p, {"op": "request", "order": "IS-1002", "now": NOW.isoformat()})["rma_number"]
    run_op(p, {"op": "receive", "rma": rma, "lines": [{"sku": "PV-SPF50-91", "unopened": 2}], "now": LATER.isoformat(),
               "process": False})
    real_complete, cut = svc.complete, {"done": False}

    def complete_on_a_dying_connection(session: Session, *args: Any, **kwargs: Any) -> Any:
        if not cut["done"]:
            cut["done"] = True
            pid = int(session.scalar(text("SELECT pg_backend_pid()")) or 0)
            assert terminate(name, pid) == 1
            TALLY["postgres backends terminated"] += 1
        return real_complete(session, *args, **kwargs)

    monkeypatch.setattr(svc, "complete", complete_on_a_dying_connection)
    assert p.claim(rma, LATER, Actor("api"))
    plan = p.plan_refund(rma)
    refs = p.pay(plan)
    with pytest.raises(TransientError):
        p.complete(refs, LATER, Actor("api"))
    assert state_of(p, rma) == "processing" and one(p, Refund) == 0
    assert_accounted_for(p)
    out = finish(p, rma, LATER, Actor("api"))  # what the Prefect retry of pay-refund / complete-return does
    assert out.state == "completed"
    p.relay(LATER)
    assert one(p, GatewaySettlement) == 2 and one(p, Refund) == 1
    settled(p, p.settings.home / "mail")


# ---- the gateway times out after paying -----------------------------------------------------------------------


class TimesOutAfterPaying:
    """Pays through the real ledger, then loses the reply on the first `failures` calls."""

    def __init__(self, inner: LedgerGateway, failures: int = 1) -> None:
        self.inner, self.failures, self.calls = inner, failures, 0

    def refund(self, *, key: str, payment_id: int, amount_cents: int) -> str:
        self.calls += 1
        reference = self.inner.refund(key=key, payment_id=payment_id, amount_cents=amount_cents)
        if self.calls <= self.failures:
            raise TransientError("gateway timeout")
        return reference


@pytest.mark.parametrize("retry", ["task-retry", "sweep"])
def test_gateway_timeout_after_paying_is_retried_without_paying_again(tmp_path: Path, db_url: str, retry: str) -> None:
    p = pipeline_at(tmp_path, db_url)
    gateway = TimesOutAfterPaying(LedgerGateway(p.engine))
    p.gateway = gateway
    rma = run_op(p, {"op": "request", "order": "IS-1002", "now": NOW.isoformat()})["rma_number"]
    with pytest.raises(TransientError, match="gateway timeout"):
        run_op(p, {"op": "receive", "rma": rma, "lines": [{"sku": "PV-SPF50-91", "unopened": 2}],
                   "now": LATER.isoformat()})
    # the first payment went through; we do not know it (the reply was lost), and recorded nothing
    assert state_of(p, rma) == "processing" and one(p, GatewaySettlement) == 1 and one(p, Refund) == 0
    assert_accounted_for(p)
    if retry == "task-retry":
        finish(p, rma, LATER, Actor("operator:dock"))  # what Prefect's retry of the task re-runs
    else:
        assert sweep(p, AFTER_LEASE).processed == [rma]
    p.relay(AFTER_LEASE)
    assert gateway.calls == 3  # the lost one asked again (answered from the ledger), the second payment once
    with unit_of_work(p.engine) as s:
        settlements = Counter(s.scalars(select(GatewaySettlement.idempotency_key)))
        refund = s.scalars(select(Refund)).one()
    assert settlements == {f"refund:{rma}:2": 1, f"refund:{rma}:3": 1} and refund.amount_cents == 8004
    TALLY["gateway keys paid exactly once"] += len(settlements)
    settled(p, p.settings.home / "mail")


class RefusesFor:
    """The real ledger, except that refunds for one RMA are refused for good (card closed, refund declined)."""

    def __init__(self, inner: LedgerGateway, rma: str) -> None:
        self.inner, self.rma, self.refused = inner, rma, 0

    def refund(self, *, key: str, payment_id: int, amount_cents: int) -> str:
        if f":{self.rma}:" in key:
            self.refused += 1
            raise PermanentError("the card issuer declined the refund")
        return self.inner.refund(key=key, payment_id=payment_id, amount_cents=amount_cents)


def test_gateway_refusing_for_good_parks_the_return_in_review_and_the_sweep_goes_on(tmp_path: Path,
                                                                                    db_url: str) -> None:
    """One return whose refund the gateway refuses must not stop the sweep (the others stuck behind it, the missing
    labels) nor come back failing every hour: it is parked in review, Customer Care is told why, and an operator's
    authorize pays it once the card is fixed."""
    p = pipeline_at(tmp_path, db_url)
    a = run_op(p, {"op": "request", "order": "IS-1001", "now": NOW.isoformat()})["rma_number"]
    b = run_op(p, {"op": "request", "order": "IS-1007", "now": NOW.isoformat()})["rma_number"]
    c = run_op(p, {"op": "request", "order": "IS-1002", "now": NOW.isoformat(), "label": False})["rma_number"]
    for rma, lines in ((a, [{"sku": "VC-SERUM-30", "unopened": 1}]), (b, [{"sku": "PV-SPF32-91", "unopened": 1}])):
        run_op(p, {"op": "receive", "rma": rma, "lines": lines, "now": LATER.isoformat(), "process": False})
    real = p.gateway
    p.gateway = RefusesFor(real, a)  # type: ignore[arg-type]
    # The sweep stage is the same code under the flow (its tasks add retries and visibility, not behaviour).
    done = sweep(p, AFTER_LEASE)
    assert done.processed == [b] and done.labels == [c]
    assert p.gateway.refused == 1  # type: ignore[attr-defined]
    assert state_of(p, a) == "review" and state_of(p, b) == "completed"
    care = [m for m in outbox(p) if m.kind == "review_needed"]
    assert len(care) == 1 and "declined the refund" in json.dumps(care[0].context)
    assert one(p, GatewaySettlement) == 1 and one(p, Refund) == 1  # b's only
    p.relay(AFTER_LEASE)
    assert_accounted_for(p)
    TALLY["scenarios parked visibly"] += 1
    assert sweep(p, AFTER_LEASE + timedelta(hours=1)).processed == []  # parked: no longer re-driven every hour
    # the card is fixed; the operator authorizes the refund again
    p.gateway = real
    assert review(p, a, True, "customer updated the card", "ops", AFTER_LEASE + timedelta(hours=2)).state == \
        "processing"
    assert finish(p, a, AFTER_LEASE + timedelta(hours=2), Actor("operator:ops")).state == "completed"
    p.relay(AFTER_LEASE + timedelta(hours=2))
    assert one(p, GatewaySettlement) == 2 and one(p, Refund) == 2
    settled(p, p.settings.home / "mail")


class RefusesOnePayment:
    """The real ledger, except that one payment's refunds under one RMA are refused for good."""

    def __init__(self, inner: LedgerGateway, rma: str, payment_id: int) -> None:
        self.inner, self.rma, self.payment_id = inner, rma, payment_id

    def refund(self, *, key: str, payment_id: int, amount_cents: int) -> str:
        if key == f"refund:{self.rma}:{payment_id}" and payment_id == self.payment_id:
            raise PermanentError("the card issuer declined the refund")
        return self.inner.refund(key=key, payment_id=payment_id, amount_cents=amount_cents)


def test_a_return_parked_after_a_partial_payout_still_holds_that_payments_room(tmp_path: Path, db_url: str) -> None:
    """A paid on one payment, then was refused on the other and parked: its payout is not recorded as a refund, yet
    a sibling return of the same order must not be paid from the same room again (R10: never beyond the capture)."""
    p = pipeline_at(tmp_path, db_url)
    placed = (NOW - timedelta(days=10)).isoformat()
    run_op(p, {"op": "import", "data": {"orders": [{
        "number": "IS-9001", "account": "ACC-1001", "channel": "direct", "placed_at": placed,
        "delivered_at": (NOW - timedelta(days=7)).isoformat(),
        "lines": [{"sku": "VC-SERUM-30", "quantity": 1, "unit_price": "60.00", "unit_tax": "0.00"},
                  {"sku": "CL-FACIAL-CLN", "quantity": 1, "unit_price": "60.00", "unit_tax": "0.00"}],
        "payments": [{"method": "visa", "amount": "70.00", "last4": "4242", "captured_at": placed},
                     {"method": "paypal", "amount": "50.00", "captured_at": (NOW - timedelta(days=9)).isoformat()}],
    }]}})
    email = "zoe.lukasiewicz@example.com"
    rmas = {}
    for sku in ("VC-SERUM-30", "CL-FACIAL-CLN"):
        req = {"order_number": "IS-9001", "email": email, "reason": "unwanted",
               "lines": [{"sku": sku, "quantity": 1, "unopened": True}]}
        rmas[sku] = p.request(parse(ReturnRequestIn, req), NOW, Actor("api")).rma_number
        p.render_label(rmas[sku])
        receive(p, parse(ReceiptIn, {"rma": rmas[sku], "received_at": LATER.isoformat(),
                                    "lines": [{"sku": sku, "unopened": 1}]}), LATER)
    a, b = rmas["VC-SERUM-30"], rmas["CL-FACIAL-CLN"]
    with unit_of_work(p.engine) as s:
        visa = s.scalars(select(Payment.id).where(Payment.order_number == "IS-9001", Payment.method == "visa")).one()
    real = p.gateway
    p.gateway = RefusesOnePayment(real, a, visa)  # type: ignore[arg-type]
    assert redrive(p, a, LATER) is False  # paid $50 to paypal, refused $10 on visa: parked
    assert state_of(p, a) == "review"
    p.gateway = real
    assert process(p, b, LATER, Actor("api")) is not None  # b must not touch paypal's room, which a used up
    with unit_of_work(p.engine) as s:
        paid = dict(s.execute(select(GatewaySettlement.payment_id, func.sum(GatewaySettlement.amount_cents))
                              .group_by(GatewaySettlement.payment_id)).all())
        captured = dict(s.execute(select(Payment.id, Payment.amount_cents)
                                  .where(Payment.order_number == "IS-9001")).all())
    assert all(paid[pid] <= captured[pid] for pid in paid), (paid, captured)
    # the operator settles a; it is paid the rest, exactly once per key
    assert review(p, a, True, "card fixed", "ops", LATER).state == "processing"
    assert finish(p, a, LATER, Actor("operator:ops")).state == "completed"
    p.relay(LATER)
    settled(p, p.settings.home / "mail")

