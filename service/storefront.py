"""What the storefront API needs from the database: keys (hashes only), verified requests, webhook endpoints and
the outbox rows that carry every transition to them. Each takes a session and never commits (the caller does)."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlmodel import Session, col

from adapters.webhooks import new_secret
from models.errors import InvalidInput, NotFound
from models.money import from_cents
from models.notices import MessageKind
from models.schemas import ReturnRequestIn, parse
from models.states import State
from models.tables import ApiKey, ApiRequest, Customer, Order, OutboxMessage, Return, WebhookEndpoint
from service.outbox import enqueue

KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The transitions a storefront hears about (issue 9): `requested` and `processing` are internal steps.
WEBHOOK_STATES = frozenset({State.AUTHORIZED, State.DECLINED, State.REVIEW, State.RECEIVED, State.COMPLETED,
                            State.EXPIRED, State.CANCELLED})


WEBHOOK_DOMAIN = "webhooks.returns.invalid"  # the outbox row's Message-ID domain; a webhook has no mail headers


class IdempotencyConflict(InvalidInput):
    """The Idempotency-Key was used before with a different request."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_name(name: str) -> str:
    if not KEY_NAME.fullmatch(name):
        raise InvalidInput("a key name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


# ---- keys ------------------------------------------------------------------------------------------------------


def create_key(session: Session, name: str, now: datetime) -> str:
    """A new key for `name`; only its hash is stored, so this is the one time it can be read."""
    if session.scalars(select(col(ApiKey.id)).where(col(ApiKey.name) == key_name(name))).first() is not None:
        raise InvalidInput(f"an API key named {name} exists already (revoked names are not reused)")
    key = "rk_" + secrets.token_urlsafe(32)
    session.add(ApiKey(name=name, key_hash=hash_key(key), created_at=now))
    session.flush()
    return key


def revoke_key(session: Session, name: str, now: datetime) -> None:
    found = session.scalars(select(ApiKey).where(col(ApiKey.name) == key_name(name))).first()
    if found is None:
        raise NotFound(f"no API key is named {name}")
    if found.revoked_at is None:
        found.revoked_at = now


def active_key(session: Session, key: str) -> ApiKey | None:
    """The live key with this secret, else None (unknown and revoked look alike)."""
    found = session.scalars(select(ApiKey).where(col(ApiKey.key_hash) == hash_key(key))).first()
    return found if found is not None and found.revoked_at is None else None


# ---- verified requests -------------------------------------------------------------------------------------------


def body_hash(req: ReturnRequestIn) -> str:
    """The same request, however its JSON was spelled, hashes the same (the email's case aside, it is R13's)."""
    canonical = req.model_dump(mode="json", exclude={"idempotency_key"}) | {"email": req.email.casefold()}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def prior_request(session: Session, api_key_id: int | None, idempotency_key: str, digest: str) -> ApiRequest | None:
    """The request stored under this key, if any; IdempotencyConflict when it was another request."""
    by_key = col(ApiRequest.api_key_id).is_(None) if api_key_id is None else col(ApiRequest.api_key_id) == api_key_id
    query = select(ApiRequest).where(by_key, col(ApiRequest.idempotency_key) == idempotency_key)
    found = session.scalars(query).first()
    if found is not None and found.body_hash != digest:
        raise IdempotencyConflict("this Idempotency-Key was already used with a different request")
    return found


def store_request(session: Session, api_key_id: int | None, idempotency_key: str, req: ReturnRequestIn,
                  now: datetime) -> ApiRequest:
    """Keep a request whose ownership (R13) the caller has checked; the flow reads it back by `reference`."""
    reference = "req_" + secrets.token_urlsafe(18)
    stored = req.model_dump(mode="json", exclude={"email"}, exclude_none=True) | {"idempotency_key": f"api-{reference}"}
    row = ApiRequest(reference=reference, api_key_id=api_key_id, idempotency_key=idempotency_key,
                     body_hash=body_hash(req), order_number=req.order_number, request=stored, created_at=now)
    session.add(row)
    session.flush()
    return row


def load_request(session: Session, reference: str) -> ApiRequest:
    found = session.scalars(select(ApiRequest).where(col(ApiRequest.reference) == reference)).first()
    if found is None:
        raise NotFound(f"no request has reference {reference[:40]}")
    return found


def owned_request(session: Session, order_number: str, fields: dict[str, Any]) -> ReturnRequestIn:
    """A request for `order_number` with its owner's email filled in here, so it never has to travel."""
    order = session.get(Order, order_number)
    customer = session.get(Customer, order.account) if order is not None else None
    if customer is None:
        raise NotFound(f"no order has number {order_number}")
    return parse(ReturnRequestIn, {k: v for k, v in fields.items() if v is not None}
                 | {"order_number": order_number, "email": customer.email})


def verified_request(session: Session, reference: str, parameters: dict[str, Any]) -> ReturnRequestIn:
    """The stored request with its owner's email put back (in memory only), if `parameters` are what was stored."""
    row = load_request(session, reference)
    req = owned_request(session, row.order_number, {k: v for k, v in parameters.items() if k != "request_ref"})
    if req.model_dump(mode="json", exclude={"email"}, exclude_none=True) != row.request:
        raise InvalidInput(f"the parameters are not the ones request {reference} was verified with")
    return req


# ---- webhooks ------------------------------------------------------------------------------------------------------


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 254 or parts.username:
        raise InvalidInput("a webhook URL is http(s)://host[:port]/path, at most 254 characters, no credentials")
    return url


def add_endpoint(session: Session, url: str, now: datetime) -> WebhookEndpoint:
    row = WebhookEndpoint(url=check_url(url), secret=new_secret(), created_at=now)
    session.add(row)
    session.flush()
    return row


def endpoints(session: Session) -> list[dict[str, Any]]:
    """Every endpoint with its deliveries counted by status and the latest few (what was sent, what failed)."""
    out = []
    for ep in session.scalars(select(WebhookEndpoint).order_by(col(WebhookEndpoint.id))):
        rows = session.execute(select(col(OutboxMessage.status), func.count()).where(
            col(OutboxMessage.key).like(f"wh:{ep.id}:%")).group_by(col(OutboxMessage.status))).all()
        latest = session.scalars(select(OutboxMessage).where(col(OutboxMessage.key).like(f"wh:{ep.id}:%"))
                                 .order_by(col(OutboxMessage.id).desc()).limit(10))
        out.append({"id": ep.id, "url": ep.url, "active": ep.disabled_at is None,
                    "deliveries": {str(s): int(n) for s, n in rows},
                    "latest": [{"event": m.context.get("type"), "rma": m.context.get("rma_number"),
                                "status": m.status, "attempts": m.attempts, "last_error": m.last_error,
                                "sent_at": m.sent_at.isoformat() if m.sent_at else None} for m in latest]})
    return out


def remove_endpoint(session: Session, endpoint_id: int, now: datetime) -> None:
    ep = session.get(WebhookEndpoint, endpoint_id)
    if ep is None:
        raise NotFound(f"no webhook endpoint has id {endpoint_id}")
    ep.disabled_at = ep.disabled_at or now


def enqueue_transition(session: Session, ret: Return, previous: State | None, transition_id: int,
                       now: datetime) -> None:
    """One outbox row per live endpoint for this transition, in the transition's own transaction (at least once)."""
    if ret.state not in WEBHOOK_STATES:
        return
    live = list(session.scalars(select(WebhookEndpoint).where(col(WebhookEndpoint.disabled_at).is_(None))))
    if not live:
        return
    event = {"id": f"evt_{ret.id}_{transition_id}", "type": f"return.{ret.state}", "created_at": now.isoformat(),
             "rma_number": ret.rma, "order_number": ret.order_number, "state": str(ret.state),
             "previous_state": str(previous) if previous else None,
             "refund_total": str(from_cents(ret.refund_total_cents))}
    for ep in live:
        enqueue(session, key=f"wh:{ep.id}:{transition_id}", kind=MessageKind.WEBHOOK, recipient=ep.url,
                context=event | {"endpoint_id": ep.id}, return_id=ret.id, now=now, domain=WEBHOOK_DOMAIN)
