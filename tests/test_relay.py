"""The outbox relay against a real SMTP server (aiosmtpd) and real databases: SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select, text, update

from adapters.config import Settings, Shop
from adapters.db import engine_for, make_engine, unit_of_work, upgrade
from adapters.mail.transport import FileTransport, SmtpTransport, Transport, eml_name, transport_from_settings
from models.notices import CARE_KINDS, EMAIL_KINDS
from models.tables import OutboxMessage
from service.outbox import enqueue
from service.relay import BACKOFF_CAP, LEASE, RelayReport, backoff, relay
from tests.helpers import free_port
from tests.smtp_server import Inbox, SmtpServer

ROOT = Path(__file__).resolve().parent.parent
AT = dt.datetime(2026, 11, 26, 15, 0, tzinfo=dt.UTC)  # when these messages go out
RMA = "RMA-7K2QMXP"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
CUSTOMER_EMAIL = "dana.whitfield@example.com"
CARE_EMAIL = "care-desk@example.com"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

_CUSTOMER = {"customer_name": "Dana Whitfield", "order_number": "IS-100234", "account": "ACC-5521", "rma": RMA,
             "return_id": None}
_CARE = {"rma": RMA, "order_number": "IS-100234", "return_id": 17}
CONTEXTS: dict[str, dict[str, Any]] = {
    "rma_issued": _CUSTOMER | {
        "lines": [{"sku": "VC-SERUM-30", "name": "Vital C Hydrating Serum", "quantity": 1, "refund": "48.60",
                   "restocking_fee": "0.00", "basis": "P3", "clauses": ["P3", "R1", "R3"]}],
        "declined_lines": [], "refund_total": "48.60", "valid_until": "2026-12-26", "prepaid": False,
        "reason": "unwanted", "resolution": "refund", "label_file": f"labels/{RMA}.pdf",
    },
    "declined": _CUSTOMER | {"rma": None, "summary": "declined", "lines": [
        {"sku": "TEE", "name": "IMAGE T-shirt", "quantity": 1, "reason": "A tshirt cannot be returned.",
         "clauses": ["P2"]}]},
    "received": _CUSTOMER | {"received_on": "2026-12-01", "process_by": "2026-12-11", "lines": [
        {"sku": "VC-SERUM-30", "name": "Vital C Hydrating Serum", "unopened": 1, "opened": 0, "damaged": 0,
         "missing": 0}]},
    "processed": _CUSTOMER | {
        "lines": [{"sku": "VC-SERUM-30", "name": "Vital C Hydrating Serum", "quantity": 1, "price": "45.00",
                   "tax": "3.60", "restocking_fee": "0.00", "refund": "48.60", "replacement_units": 0,
                   "note": "Refund for unopened units."}],
        "refund_total": "48.60", "payments": [{"method": "visa", "last4": "4242", "amount": "48.60"}],
        "resolution": "refund",
    },
    "expired": _CUSTOMER | {"valid_until": "2026-12-26"},
    "review_needed": _CARE | {"reasons": ["no expiration date is recorded for this lot"]},
    "due_soon": _CARE | {"received_on": "2026-12-01", "deadline": "2026-12-11T15:04:00+00:00", "state": "received"},
    "overdue": _CARE | {"received_on": "2026-12-01", "deadline": "2026-12-11T15:04:00+00:00", "state": "processing"},
    "escalated": _CARE | {"why": "a pipeline run for it failed, so it will not move on by itself", "state": "received",
                         "received_on": "2026-12-01", "deadline": "2026-12-11T15:04:00+00:00", "refund_total": "48.60",
                         "flow_run_id": "0f3c2a52-8e0b-4a53-9a55-3d1f0c9e2b71",
                         "lines": [{"sku": "VC-SERUM-30", "quantity": 1, "decision": "authorized"}]},
}
SUBJECTS = {
    "rma_issued": f"Your return {RMA} is authorized",
    "declined": "About your return request for order IS-100234",
    "received": f"We've received your return {RMA}",
    "processed": f"Your refund of $48.60 for return {RMA} is on its way",
    "expired": f"Your return authorization {RMA} has expired",
    "review_needed": f"Review needed: {RMA} (order IS-100234)",
    "due_soon": f"Due soon: {RMA} must be processed by December 11, 2026 at 10:04 AM ET",
    "overdue": f"OVERDUE: {RMA} passed its processing deadline (December 11, 2026 at 10:04 AM ET)",
    "escalated": f"Escalated: {RMA} (order IS-100234) needs Customer Care now",
}


# ---- fixtures ----------------------------------------------------------------------------------------------


class Server(SmtpServer):
    """The relay tests' server: an Inbox on a free loopback port."""

    def __init__(self, port: int) -> None:
        super().__init__(Inbox(), port)

    @property
    def inbox(self) -> Inbox:
        return self.handler  # type: ignore[no-any-return]


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(free_port())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    root = tmp_path / "home"
    (root / "labels").mkdir(parents=True)
    (root / "labels" / f"{RMA}.pdf").write_bytes(PDF)
    return root


@pytest.fixture
def db(tmp_path: Path) -> tuple[Engine, str]:
    """A migrated SQLite database of this test's own."""
    url = f"sqlite:///{tmp_path / 'returns.db'}"
    upgrade(url)
    return make_engine(url), url


def settings_for(home: Path, url: str, smtp_url: str | None) -> Settings:
    return Settings(home=home, database_url=url, smtp_url=smtp_url, care_address=CARE_EMAIL, shop=Shop())


def add(engine: Engine, kind: str, *, key: str | None = None, recipient: str | None = None,
        context: dict[str, Any] | None = None, now: dt.datetime = AT) -> OutboxMessage:
    with unit_of_work(engine) as session:
        return enqueue(session, key=key or f"t:{kind}", kind=kind,
                       recipient=recipient or (CARE_EMAIL if kind in CARE_KINDS else CUSTOMER_EMAIL),
                       context=context if context is not None else CONTEXTS[kind], return_id=None, now=now,
                       domain=Shop().message_id_domain)


def row(engine: Engine, row_id: int | None) -> OutboxMessage:
    with unit_of_work(engine) as session:
        found = session.get(OutboxMessage, row_id)
        assert found is not None
        return found


def all_rows(engine: Engine) -> list[OutboxMessage]:
    with unit_of_work(engine) as session:
        return list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def assert_no_addresses(report: RelayReport) -> None:
    dumped = json.dumps([report.sent, report.failed, report.deferred, report.halted], default=str)
    assert "example.com" not in dumped


# ---- delivery ----------------------------------------------------------------------------------------------


def test_relay_delivers_every_kind_over_smtp(db: tuple[Engine, str], home: Path, server: Server) -> None:
    engine, url = db
    rows = {kind: add(engine, kind) for kind in sorted(EMAIL_KINDS)}
    report = relay(engine, SmtpTransport.from_url(server.url), settings=settings_for(home, url, server.url), now=AT)

    assert [r["kind"] for r in report.sent] == sorted(EMAIL_KINDS)  # id order = insertion order here
    assert report.failed == [] and report.deferred == [] and report.halted is None
    assert_no_addresses(report)
    arrived = {str(msg["Message-ID"]): (rcpts, msg) for rcpts, msg in server.inbox.received()}
    assert len(arrived) == len(EMAIL_KINDS) == len(server.inbox.messages)
    for kind, r in rows.items():
        rcpts, msg = arrived[r.message_id]
        expected = CARE_EMAIL if kind in CARE_KINDS else CUSTOMER_EMAIL
        assert rcpts == [expected] and msg["To"] == expected
        assert msg["From"] == Shop().mail_from
        assert msg["Subject"] == SUBJECTS[kind]
        text = msg.get_body(("plain",))
        html = msg.get_body(("html",))
        assert text is not None and html is not None
        assert Shop().care_phone in text.get_content() and Shop().care_phone in html.get_content()
        attachments = list(msg.iter_attachments())  # type: ignore[attr-defined]
        if kind == "rma_issued":
            assert [(a.get_content_type(), a.get_filename(), a.get_content()) for a in attachments] == [
                ("application/pdf", f"{RMA}.pdf", PDF)]
        else:
            assert attachments == []
        stored = row(engine, r.id)
        assert (stored.status, stored.attempts, stored.sent_at, stored.last_error) == ("sent", 1, AT, None)

    again = relay(engine, SmtpTransport.from_url(server.url), settings=settings_for(home, url, server.url), now=AT)
    assert again == RelayReport()  # nothing left to send
    assert len(server.inbox.messages) == len(EMAIL_KINDS)


def test_xss_name_arrives_escaped_in_the_html_part(db: tuple[Engine, str], home: Path, server: Server) -> None:
    engine, url = db
    add(engine, "expired", context=CONTEXTS["expired"] | {"customer_name": "<img src=x onerror=alert(1)>"})
    relay(engine, SmtpTransport.from_url(server.url), settings=settings_for(home, url, server.url), now=AT)
    [(_, msg)] = server.inbox.received()
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "<img" not in html and "Hi &lt;img src=x onerror=alert(1)&gt;," in html
    assert "Hi <img src=x onerror=alert(1)>," in msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]


def test_header_injection_in_the_context_adds_no_recipient(db: tuple[Engine, str], home: Path,
                                                           server: Server) -> None:
    engine, url = db
    evil = "Eve\r\nBcc: attacker@evil.example\r\n"
    add(engine, "declined", context=CONTEXTS["declined"] | {"customer_name": evil,
                                                             "order_number": "IS-1\r\nBcc: attacker@evil.example"})
    report = relay(engine, SmtpTransport.from_url(server.url), settings=settings_for(home, url, server.url), now=AT)
    assert len(report.sent) == 1
    [(rcpts, msg)] = server.inbox.received()
    assert rcpts == [CUSTOMER_EMAIL]
    assert msg["Bcc"] is None
    assert msg["Subject"] == "About your return request for order IS-1 Bcc: attacker@evil.example"


def test_injected_recipient_fails_the_row_and_sends_nothing(db: tuple[Engine, str], home: Path,
                                                            server: Server) -> None:
    engine, url = db
    r = add(engine, "expired", recipient=f"{CUSTOMER_EMAIL}\r\nBcc: attacker@evil.example")
    report = relay(engine, SmtpTransport.from_url(server.url), settings=settings_for(home, url, server.url), now=AT)
    assert [f["id"] for f in report.failed] == [r.id] and "InvalidRecipient" in report.failed[0]["error"]
    assert server.inbox.messages == []
    assert row(engine, r.id).status == "failed"


def test_missing_template_variable_fails_the_row_and_sends_nothing(db: tuple[Engine, str], home: Path,
                                                                   server: Server) -> None:
    engine, url = db
    context = dict(CONTEXTS["rma_issued"])
    del context["valid_until"]
    bad = add(engine, "rma_issued", context=context)
    good = add(engine, "expired")
    report = relay(engine, SmtpTransport.from_url(server.url), settings=settings_for(home, url, server.url), now=AT)
    assert [f["id"] for f in report.failed] == [bad.id]
    assert "valid_until" in report.failed[0]["error"]
    assert [s["id"] for s in report.sent] == [good.id]
    stored = row(engine, bad.id)
    assert stored.status == "failed" and "valid_until" in (stored.last_error or "") and stored.sent_at is None
    assert server.inbox.message_ids() == [good.message_id]


def test_missing_label_waits_for_the_label_then_sends(db: tuple[Engine, str], home: Path, server: Server) -> None:
    engine, url = db
    label = home / "labels" / f"{RMA}.pdf"
    label.unlink()  # the label is written after the commit that queued the email: a relay can get there first
    r = add(engine, "rma_issued")
    other = add(engine, "expired")
    settings = settings_for(home, url, server.url)
    report = relay(engine, SmtpTransport.from_url(server.url), settings=settings, now=AT)
    # The waiting row is not picked up (no attempt spent, no backoff); the row behind it goes out.
    assert [s["id"] for s in report.sent] == [other.id] and not report.deferred and not report.failed
    stored = row(engine, r.id)
    assert stored.status == "pending" and stored.attempts == 0

    label.write_bytes(PDF)
    report = relay(engine, SmtpTransport.from_url(server.url), settings=settings, now=AT)
    assert [s["id"] for s in report.sent] == [r.id]
    assert server.inbox.message_ids() == [other.message_id, r.message_id]


def test_label_outside_home_fails_the_row(db: tuple[Engine, str], home: Path, server: Server) -> None:
    engine, url = db
    r = add(engine, "rma_issued", context=CONTEXTS["rma_issued"] | {"label_file": "../../etc/passwd"})
    report = relay(engine, SmtpTransport.from_url(server.url), settings=settings_for(home, url, server.url), now=AT)
    assert [f["id"] for f in report.failed] == [r.id] and "outside RETURNS_HOME" in report.failed[0]["error"]
    assert server.inbox.messages == []


def test_rejected_recipient_fails_the_row_visibly(db: tuple[Engine, str], home: Path, server: Server) -> None:
    engine, url = db
    r = add(engine, "expired", recipient="rejected.customer@example.com")
    report = relay(engine, SmtpTransport.from_url(server.url), settings=settings_for(home, url, server.url), now=AT)
    assert [f["id"] for f in report.failed] == [r.id]
    assert "550" in report.failed[0]["error"]
    assert_no_addresses(report)  # the server's reply quoted the address; the report does not
    stored = row(engine, r.id)
    assert stored.status == "failed" and stored.attempts == 1 and "550" in (stored.last_error or "")
    assert len(all_rows(engine)) == 1  # kept, never deleted


def test_smtp_down_defers_then_delivers_when_it_is_back(db: tuple[Engine, str], home: Path) -> None:
    engine, url = db
    srv = Server(free_port())  # nothing listening yet
    first, second = add(engine, "expired"), add(engine, "received")
    transport = SmtpTransport.from_url(srv.url)
    report = relay(engine, transport, settings=settings_for(home, url, srv.url), now=AT)
    assert report.sent == [] and report.failed == []
    assert [d["id"] for d in report.deferred] == [first.id]
    assert report.halted is not None and "unreachable" in report.halted  # the second row was not even tried
    one, two = row(engine, first.id), row(engine, second.id)
    assert (one.status, one.attempts) == ("pending", 1)
    assert one.next_attempt_at > AT and one.last_error and "unreachable" in one.last_error
    assert (two.status, two.attempts, two.next_attempt_at) == ("pending", 0, AT)

    srv.start()
    try:
        early = relay(engine, transport, settings=settings_for(home, url, srv.url), now=AT + dt.timedelta(seconds=1))
        assert [s["id"] for s in early.sent] == [second.id]  # the first waits for its backoff
        later = relay(engine, transport, settings=settings_for(home, url, srv.url), now=one.next_attempt_at)
        assert [s["id"] for s in later.sent] == [first.id]
        assert sorted(srv.inbox.message_ids()) == sorted([first.message_id, second.message_id])
        assert row(engine, first.id).attempts == 2 and row(engine, first.id).status == "sent"
    finally:
        srv.stop()


def test_transient_refusals_back_off_then_fail_after_max_attempts(db: tuple[Engine, str], home: Path,
                                                                  server: Server) -> None:
    engine, url = db
    r = add(engine, "expired", recipient="later.customer@example.com")  # 451 every time
    now, waits = AT, []
    for attempt in range(1, 4):
        report = relay(engine, SmtpTransport.from_url(server.url), settings=settings_for(home, url, server.url),
                       now=now, max_attempts=3)
        stored = row(engine, r.id)
        assert stored.attempts == attempt
        if attempt < 3:
            assert [d["id"] for d in report.deferred] == [r.id] and stored.status == "pending"
            assert "451" in (stored.last_error or "") and report.halted is None
            waits.append(stored.next_attempt_at - now)
            assert relay(engine, SmtpTransport.from_url(server.url), settings=settings_for(home, url, server.url),
                         now=stored.next_attempt_at - dt.timedelta(seconds=1)) == RelayReport()  # not yet due
            now = stored.next_attempt_at
        else:
            assert [f["id"] for f in report.failed] == [r.id] and stored.status == "failed"
            assert "gave up after 3 attempts" in (stored.last_error or "")
    assert waits == [backoff(r.id or 0, 1), backoff(r.id or 0, 2)]
    assert server.inbox.messages == []


def test_backoff_is_exponential_jittered_by_row_and_capped() -> None:
    for row_id in (1, 2, 999):
        delays = [backoff(row_id, n) for n in range(1, 12)]
        assert delays == [backoff(row_id, n) for n in range(1, 12)]  # deterministic
        for n, delay in enumerate(delays, start=1):
            ceiling = min(60 * 2 ** (n - 1), 3600)
            assert ceiling / 2 <= delay.total_seconds() <= ceiling
        assert max(delays) <= BACKOFF_CAP
    assert backoff(1, 3) != backoff(2, 3)  # rows do not retry in lockstep


# ---- crashes: at-least-once, never lost ----------------------------------------------------------------------


class Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way may catch it."""


class DieAfterSend:
    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    def send(self, msg: EmailMessage) -> None:
        self.inner.send(msg)
        raise Killed()


def test_killed_between_send_and_mark_resends_with_the_same_message_id(db: tuple[Engine, str], home: Path,
                                                                       server: Server) -> None:
    engine, url = db
    settings = settings_for(home, url, server.url)
    r = add(engine, "rma_issued")
    smtp = SmtpTransport.from_url(server.url)
    with pytest.raises(Killed):
        relay(engine, DieAfterSend(smtp), settings=settings, now=AT)
    stored = row(engine, r.id)
    assert (stored.status, stored.attempts) == ("pending", 1)  # sent, but not marked
    assert stored.next_attempt_at == AT + LEASE
    assert relay(engine, smtp, settings=settings, now=AT) == RelayReport()  # leased: no concurrent double send

    report = relay(engine, smtp, settings=settings, now=AT + LEASE)
    assert [s["id"] for s in report.sent] == [r.id]
    assert server.inbox.message_ids() == [r.message_id, r.message_id]  # at-least-once, same Message-ID
    stored = row(engine, r.id)
    assert (stored.status, stored.attempts) == ("sent", 2)


def test_repeated_crashes_end_failed_not_lost(db: tuple[Engine, str], home: Path, server: Server) -> None:
    engine, url = db
    settings = settings_for(home, url, server.url)
    r = add(engine, "expired")
    now = AT
    for _ in range(3):
        with pytest.raises(Killed):
            relay(engine, DieAfterSend(SmtpTransport.from_url(server.url)), settings=settings, now=now,
                  max_attempts=3)
        now += LEASE
    report = relay(engine, SmtpTransport.from_url(server.url), settings=settings, now=now, max_attempts=3)
    assert [f["id"] for f in report.failed] == [r.id] and "gave up" in report.failed[0]["error"]
    assert row(engine, r.id).status == "failed"
    assert len(server.inbox.messages) == 3


_KILL_SCRIPT = """
import os, signal, sys
from datetime import datetime
from pathlib import Path
from adapters.config import Settings
from adapters.db import make_engine
from adapters.mail.transport import SmtpTransport
from service.relay import relay

url, smtp_url, home, now = sys.argv[1:5]
inner = SmtpTransport.from_url(smtp_url)

class KillAfterSend:
    def send(self, msg):
        inner.send(msg)
        os.kill(os.getpid(), signal.SIGKILL)

settings = Settings(home=Path(home), database_url=url, smtp_url=smtp_url, care_address="care@example.com")
relay(make_engine(url), KillAfterSend(), settings=settings, now=datetime.fromisoformat(now))
"""


def test_sigkill_between_send_and_mark(db: tuple[Engine, str], home: Path, server: Server) -> None:
    engine, url = db
    r = add(engine, "processed")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, url, server.url, str(home), AT.isoformat()],
                          cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert server.inbox.message_ids() == [r.message_id]
    stored = row(engine, r.id)
    assert (stored.status, stored.attempts) == ("pending", 1)

    report = relay(engine, SmtpTransport.from_url(server.url), settings=settings_for(home, url, server.url),
                   now=AT + LEASE)
    assert [s["id"] for s in report.sent] == [r.id]
    assert server.inbox.message_ids() == [r.message_id, r.message_id]
    assert row(engine, r.id).status == "sent"


# ---- file transport ----------------------------------------------------------------------------------------


def test_relay_over_the_file_transport(db: tuple[Engine, str], home: Path) -> None:
    engine, url = db
    settings = settings_for(home, url, None)
    transport = transport_from_settings(settings)
    assert transport == FileTransport(home / "mail")
    rows = [add(engine, kind) for kind in sorted(EMAIL_KINDS)]
    report = relay(engine, transport, settings=settings, now=AT)
    assert len(report.sent) == len(EMAIL_KINDS)
    files = sorted(p.name for p in (home / "mail").iterdir())
    assert files == sorted(eml_name(r.message_id) for r in rows)
    for r in rows:
        parsed = BytesParser(policy=email_policy.default).parsebytes((home / "mail" / eml_name(r.message_id))
                                                                     .read_bytes())
        assert parsed["Message-ID"] == r.message_id and parsed["Subject"] == SUBJECTS[r.kind]
        assert parsed.get_body(("plain",)) is not None and parsed.get_body(("html",)) is not None  # type: ignore[attr-defined]

    with unit_of_work(engine) as session:  # a resend (e.g. after a crash) lands in the same file
        session.exec(update(OutboxMessage).where(OutboxMessage.id == rows[0].id)
                     .values(status="pending", next_attempt_at=AT))
    assert len(relay(engine, transport, settings=settings, now=AT).sent) == 1
    assert len(list((home / "mail").iterdir())) == len(EMAIL_KINDS)


def test_limit_bounds_one_run(db: tuple[Engine, str], home: Path) -> None:
    engine, url = db
    for i in range(5):
        add(engine, "expired", key=f"t:{i}")
    settings = settings_for(home, url, None)
    assert len(relay(engine, transport_from_settings(settings), settings=settings, now=AT, limit=2).sent) == 2
    assert len(relay(engine, transport_from_settings(settings), settings=settings, now=AT).sent) == 3


def test_future_rows_wait(db: tuple[Engine, str], home: Path) -> None:
    engine, url = db
    add(engine, "expired", now=AT + dt.timedelta(minutes=1))
    settings = settings_for(home, url, None)
    assert relay(engine, transport_from_settings(settings), settings=settings, now=AT) == RelayReport()
    with pytest.raises(ValueError):
        relay(engine, transport_from_settings(settings), settings=settings, now=AT.replace(tzinfo=None))


# ---- concurrency: two relays never send the same row twice --------------------------------------------------


@pytest.fixture
def mail_pg_url() -> Iterator[str]:
    """A private, migrated schema on the PostgreSQL server, dropped afterwards."""
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("select 1"))
    except Exception:  # noqa: BLE001
        admin.dispose()
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432")
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    schema = f"mail_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_ADMIN}?options=-csearch_path%3D{schema}"
    try:
        upgrade(url)
        yield url
    finally:
        engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class SlowRecorder:
    """Sends through SMTP, slowly enough that two relays really overlap; remembers which thread sent what."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.sent: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def send(self, msg: EmailMessage) -> None:
        time.sleep(0.01)
        self.inner.send(msg)
        with self.lock:
            self.sent.append((threading.current_thread().name, str(msg["Message-ID"])))


def _race(engine: Engine, url: str, home: Path, server: Server) -> None:
    rows = [add(engine, "expired", key=f"race:{i}") for i in range(20)]
    settings = settings_for(home, url, server.url)
    transport = SlowRecorder(SmtpTransport.from_url(server.url))
    barrier = threading.Barrier(2)
    reports: dict[str, RelayReport] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            barrier.wait()
            reports[name] = relay(engine, transport, settings=settings, now=AT)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in ("relay-a", "relay-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    ids = server.inbox.message_ids()
    assert sorted(ids) == sorted(r.message_id for r in rows)  # each exactly once
    sent_a = {s["id"] for s in reports["relay-a"].sent}
    sent_b = {s["id"] for s in reports["relay-b"].sent}
    assert sent_a.isdisjoint(sent_b) and sent_a | sent_b == {r.id for r in rows}
    assert all(r.status == "sent" and r.attempts == 1 for r in all_rows(engine))


@pytest.mark.postgres
def test_two_relays_on_postgresql_send_each_row_once(mail_pg_url: str, home: Path, server: Server) -> None:
    engine = make_engine(mail_pg_url)
    try:
        _race(engine, mail_pg_url, home, server)
    finally:
        engine.dispose()


def test_two_relays_on_sqlite_send_each_row_once(db: tuple[Engine, str], home: Path, server: Server) -> None:
    engine, url = db
    _race(engine, url, home, server)
