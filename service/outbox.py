"""The transactional outbox: enqueue an email in the caller's transaction, once per (return, kind)."""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import select
from sqlmodel import Session, col

from models.notices import MessageKind, OutboxStatus
from models.tables import OutboxMessage


def message_id_for(key: str, domain: str) -> str:
    """A Message-ID that is the same on every send of the same outbox row."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"<{digest}@{domain}>"


def enqueue(
    session: Session,
    *,
    key: str,
    kind: MessageKind,
    recipient: str,
    context: dict[str, object],
    return_id: int | None,
    now: datetime,
    domain: str,
) -> OutboxMessage:
    """Add the message unless one with `key` exists (then return that one); never commits."""
    kind = MessageKind(kind)
    existing = session.scalars(select(OutboxMessage).where(col(OutboxMessage.key) == key)).first()
    if existing is not None:
        return existing
    msg = OutboxMessage(
        key=key,
        return_id=return_id,
        kind=kind,
        recipient=recipient,
        context=context,
        message_id=message_id_for(key, domain),
        status=OutboxStatus.PENDING,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(msg)
    session.flush()
    return msg
