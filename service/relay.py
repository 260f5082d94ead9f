"""The outbox relay: delivers each pending email at least once, always under its stable Message-ID.

One row at a time: a short transaction claims it (`FOR UPDATE SKIP LOCKED` on PostgreSQL, the write lock
on SQLite) and pushes its `next_attempt_at` forward by a lease, so no other relay picks it while it is
being sent; the send happens outside any transaction; a second short transaction records the outcome.
A relay that dies between send and record leaves the row pending; once the lease runs out the next
relay sends it again with the same Message-ID (at-least-once, never lost).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select, update
from sqlmodel import col

from adapters import webhooks
from adapters.crashpoints import crash_point
from adapters.db import unit_of_work
from adapters.mail.message import AttachmentMissing, render
from adapters.mail.transport import Transport, TransportUnavailable
from adapters.redact import redact
from models.errors import PermanentError
from models.notices import MessageKind, OutboxStatus
from models.tables import OutboxMessage, WebhookEndpoint

if TYPE_CHECKING:
    from adapters.config import Settings

LEASE = timedelta(minutes=5)
CLAIM_WINDOW = 20  # rows looked at per claim, so a few 'RMA issued' rows waiting for their label block nothing
BACKOFF_BASE = timedelta(minutes=1)
BACKOFF_CAP = timedelta(hours=1)



@dataclass
class RelayReport:
    """What one relay run did, by outbox row; ids, kinds and errors only - no addresses, safe to log."""

    sent: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    deferred: list[dict[str, Any]] = field(default_factory=list)
    halted: str | None = None  # why the run stopped early (the transport is unreachable), else None

    OUTCOMES = ("sent", "failed", "deferred")

    def rows(self) -> list[dict[str, Any]]:
        """One row per message handled, for a run's table artifact (ids, kinds, errors: no addresses)."""
        return [{"outcome": outcome, **row} for outcome in self.OUTCOMES for row in getattr(self, outcome)] + (
            [{"outcome": "halted", "error": self.halted}] if self.halted else [])

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> RelayReport:
        report = cls()
        for row in rows:
            outcome = row.pop("outcome", None)
            if outcome == "halted":
                report.halted = row.get("error")
            elif outcome in cls.OUTCOMES:
                getattr(report, outcome).append(row)
        return report

    def to_json(self) -> dict[str, Any]:
        return {"sent": self.sent, "failed": self.failed, "deferred": self.deferred, "halted": self.halted}


@dataclass(frozen=True)
class _Claimed:
    id: int
    key: str
    kind: str
    recipient: str
    context: dict[str, object]
    message_id: str
    attempts: int  # including the attempt this claim starts

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key, "kind": self.kind, "message_id": self.message_id,
                "attempts": self.attempts}


def backoff(row_id: int, attempts: int) -> timedelta:
    """Delay after the `attempts`-th failure: 1 min doubling, capped at 1 h, jittered to 50-100% by the row id."""
    exponent = min(max(attempts - 1, 0), 20)
    ceiling = min(BACKOFF_BASE.total_seconds() * 2**exponent, BACKOFF_CAP.total_seconds())
    digest = hashlib.sha256(f"outbox:{row_id}:{attempts}".encode()).digest()
    fraction = int.from_bytes(digest[:4], "big") / 2**32
    return timedelta(seconds=round(ceiling * (0.5 + 0.5 * fraction), 3))


def scrub(text: str, limit: int = 500) -> str:
    """An error message fit for logs: email addresses and phone numbers are replaced (the one redaction)."""
    return redact(text)[:limit]


def _label_written(home: Path, row: OutboxMessage) -> bool:
    """An 'RMA issued' row waits until its label PDF is on disk (it is written after the commit that queued it)."""
    label = row.context.get("label_file")
    if row.kind is not MessageKind.RMA_ISSUED or not isinstance(label, str):
        return True
    path = (home / label).resolve()
    # A path outside the home is picked up at once, so rendering fails the row visibly instead of it waiting forever.
    return not path.is_relative_to(home.resolve()) or path.exists()


def _claim(engine: Engine, now: datetime, lease: timedelta, home: Path, return_id: int | None) -> _Claimed | None:
    """The oldest due pending row (of `return_id` when given) whose attachment is ready, leased to this relay
    (attempts counted now); None when nothing is due."""
    with unit_of_work(engine) as session:
        query = (select(OutboxMessage)
                 .where(col(OutboxMessage.status) == OutboxStatus.PENDING, col(OutboxMessage.next_attempt_at) <= now))
        if return_id is not None:
            query = query.where(col(OutboxMessage.return_id) == return_id)
        rows = session.scalars(query.order_by(col(OutboxMessage.id)).limit(CLAIM_WINDOW)
                               .with_for_update(skip_locked=True)).all()
        row = next((r for r in rows if _label_written(home, r)), None)
        if row is None or row.id is None:
            return None
        row.attempts += 1
        row.next_attempt_at = now + lease
        return _Claimed(
            id=row.id,
            key=row.key,
            kind=row.kind,
            recipient=row.recipient,
            context=dict(row.context),
            message_id=row.message_id,
            attempts=row.attempts,
        )


def _record(engine: Engine, row_id: int, **values: object) -> None:
    """Record an outcome, unless someone already settled the row (then theirs stands)."""
    with unit_of_work(engine) as session:
        session.exec(
            update(OutboxMessage)
            .where(col(OutboxMessage.id) == row_id, col(OutboxMessage.status) == OutboxStatus.PENDING)
            .values(**values)
        )


def _retry_later(
    engine: Engine, report: RelayReport, row: _Claimed, exc: BaseException, now: datetime, max_attempts: int
) -> str:
    """Back off (or, out of attempts, fail visibly); returns the logged error."""
    error = scrub(f"{type(exc).__name__}: {exc}")
    if row.attempts >= max_attempts:
        gave_up = f"gave up after {row.attempts} attempts: {error}"
        _record(engine, row.id, status=OutboxStatus.FAILED, last_error=gave_up)
        report.failed.append({**row.info(), "error": error})
    else:
        retry_at = now + backoff(row.id, row.attempts)
        _record(engine, row.id, next_attempt_at=retry_at, last_error=error)
        report.deferred.append({**row.info(), "error": error, "next_attempt_at": retry_at.isoformat()})
    return error


Poster = Callable[[str, str, bytes, str, int], int]


def _deliver_webhook(engine: Engine, report: RelayReport, row: _Claimed, now: datetime, max_attempts: int,
                     post: Poster) -> None:
    """POST one transition, signed with its endpoint's secret; an endpoint that is down does not halt the mail."""
    with unit_of_work(engine) as session:
        endpoint = session.get(WebhookEndpoint, row.context.get("endpoint_id"))
        secret = endpoint.secret if endpoint is not None and endpoint.disabled_at is None else None
    if secret is None:
        _record(engine, row.id, status=OutboxStatus.FAILED, last_error="the webhook endpoint was removed")
        report.failed.append({**row.info(), "error": "the webhook endpoint was removed"})
        return
    event = {k: v for k, v in row.context.items() if k != "endpoint_id"}
    body = json.dumps(event, sort_keys=True, separators=(",", ":")).encode()
    try:
        post(row.recipient, secret, body, str(event.get("id")), int(now.timestamp()))
    except Exception as exc:  # DeliveryFailed, or a bug: retried with backoff, then failed visibly
        _retry_later(engine, report, row, exc, now, max_attempts)
        return
    _record(engine, row.id, status=OutboxStatus.SENT, sent_at=now)
    report.sent.append(row.info())


def relay(
    engine: Engine,
    transport: Transport,
    *,
    settings: Settings,
    now: datetime,
    limit: int = 100,
    max_attempts: int = 8,
    lease: timedelta = LEASE,
    return_id: int | None = None,
    post: Poster = webhooks.post,
) -> RelayReport:
    """Send up to `limit` due outbox rows in id order (only `return_id`'s when given: a stage sends its own mail and
    webhooks); a row is marked sent only after its send succeeded."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    report = RelayReport()
    for _ in range(limit):
        row = _claim(engine, now, lease, settings.home, return_id)
        if row is None:
            break
        if row.attempts > max_attempts:  # earlier attempts died mid-send (crash): stop trying, visibly
            error = f"gave up: {row.attempts - 1} attempts started, none recorded an outcome"
            _record(engine, row.id, status=OutboxStatus.FAILED, last_error=error)
            report.failed.append({**row.info(), "error": error})
            continue
        if row.kind == MessageKind.WEBHOOK:
            _deliver_webhook(engine, report, row, now, max_attempts, post)
            continue
        try:
            msg = render(
                row.kind,
                row.context,
                recipient=row.recipient,
                message_id=row.message_id,
                shop=settings.shop,
                home=settings.home,
                date=now,
            )
            transport.send(msg)
        except PermanentError as exc:
            # A missing label is the one render error worth waiting for: the PDF is written after the commit
            # that queued this email, and the sweep re-renders labels a crash left missing.
            if not isinstance(exc, AttachmentMissing):
                error = scrub(f"{type(exc).__name__}: {exc}")
                _record(engine, row.id, status=OutboxStatus.FAILED, last_error=error)
                report.failed.append({**row.info(), "error": error})
                continue
            _retry_later(engine, report, row, exc, now, max_attempts)
            continue
        except Exception as exc:  # TransientError, or a bug: retried with backoff, then failed visibly
            error = _retry_later(engine, report, row, exc, now, max_attempts)
            if isinstance(exc, TransportUnavailable):  # every other row would fail the same way right now
                report.halted = error
                break
            continue
        crash_point("relay.after-send")
        _record(engine, row.id, status=OutboxStatus.SENT, sent_at=now)
        report.sent.append(row.info())
    return report
