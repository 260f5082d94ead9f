"""SQLModel tables: the returns database is the source of truth (docs/architecture.md). Money is integer cents."""

from __future__ import annotations

from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from sqlalchemy import JSON, Column, DateTime, Index, String, Text, TypeDecorator, UniqueConstraint
from sqlmodel import Field, SQLModel

from models.notices import MessageKind, OutboxStatus
from models.policy import Basis, Outcome, Reason, Resolution
from models.states import State


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes as UTC and always returns them aware (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime reached the database")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


E = TypeVar("E", bound=StrEnum)


class EnumText(TypeDecorator[E], Generic[E]):
    """A StrEnum stored as its plain value (VARCHAR, no database enum type) and read back as the enum."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: E | str | None, dialect: object) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: str | None, dialect: object) -> E | None:
        return None if value is None else self.enum(value)


def enum_column(enum: type[StrEnum], length: int, *, nullable: bool = False, index: bool = False) -> Any:
    """A typed StrEnum column (a Field: typed Any, as SQLModel's own Field is)."""
    return Field(sa_column=Column(EnumText(enum, length), nullable=nullable, index=index))


def ts(nullable: bool = True, index: bool = False) -> Any:
    """A timezone-aware timestamp column (a Field: typed Any, as SQLModel's own Field is)."""
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class Product(SQLModel, table=True):
    __tablename__ = "products"
    sku: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    kind: str = Field(max_length=20)
    size: str = Field(max_length=20)
    final_sale: bool = False
    price_cents: int | None = None


class Customer(SQLModel, table=True):
    __tablename__ = "customers"
    account: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    email: str = Field(max_length=254)
    line1: str = Field(max_length=200)
    line2: str = Field(default="", max_length=200)
    city: str = Field(max_length=100)
    region: str = Field(default="", max_length=100)
    postal_code: str = Field(max_length=20)
    country: str = Field(max_length=2)


class Order(SQLModel, table=True):
    __tablename__ = "orders"
    number: str = Field(primary_key=True, max_length=64)
    account: str = Field(foreign_key="customers.account", index=True, max_length=64)
    channel: str = Field(max_length=10)
    placed_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    delivered_at: datetime | None = ts()


class OrderLine(SQLModel, table=True):
    __tablename__ = "order_lines"
    __table_args__ = (UniqueConstraint("order_number", "sku"),)
    id: int | None = Field(default=None, primary_key=True)
    order_number: str = Field(foreign_key="orders.number", index=True, max_length=64)
    sku: str = Field(foreign_key="products.sku", max_length=64)
    quantity: int
    unit_price_cents: int
    unit_tax_cents: int
    expires_on: date | None = None


class Payment(SQLModel, table=True):
    __tablename__ = "payments"
    __table_args__ = (UniqueConstraint("order_number", "seq"),)
    id: int | None = Field(default=None, primary_key=True)
    order_number: str = Field(foreign_key="orders.number", index=True, max_length=64)
    seq: int
    method: str = Field(max_length=20)
    amount_cents: int
    refunded_cents: int = 0
    last4: str | None = Field(default=None, max_length=4)
    captured_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    provider: str = Field(default="ledger", max_length=20)  # who captured it and so refunds it
    reference: str | None = Field(default=None, max_length=128)  # the provider's id for the captured payment


class Return(SQLModel, table=True):
    __tablename__ = "returns"
    __table_args__ = (UniqueConstraint("order_number", "idempotency_key"),)
    id: int | None = Field(default=None, primary_key=True)
    rma: str | None = Field(default=None, unique=True, max_length=16)
    order_number: str = Field(foreign_key="orders.number", index=True, max_length=64)
    idempotency_key: str | None = Field(default=None, max_length=128)
    reason: Reason = enum_column(Reason, 20)
    resolution: Resolution = enum_column(Resolution, 20)
    state: State = enum_column(State, 20, index=True)
    policy_version: str = Field(max_length=40)
    decision: dict[str, object] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    refund_total_cents: int = 0
    requested_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    rma_issued_at: datetime | None = ts()
    rma_expires_at: datetime | None = ts(index=True)
    received_at: datetime | None = ts()
    deadline_at: datetime | None = ts(index=True)
    claimed_until: datetime | None = ts()
    completed_at: datetime | None = ts()
    due_soon_flagged_at: datetime | None = ts()
    overdue_flagged_at: datetime | None = ts()
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class ReturnLine(SQLModel, table=True):
    __tablename__ = "return_lines"
    id: int | None = Field(default=None, primary_key=True)
    return_id: int = Field(foreign_key="returns.id", index=True)
    order_line_id: int = Field(foreign_key="order_lines.id", index=True)
    sku: str = Field(max_length=64)
    quantity: int
    unopened_declared: bool
    exchange_sku: str | None = Field(default=None, max_length=64)
    outcome: Outcome = enum_column(Outcome, 20)
    basis: Basis = enum_column(Basis, 4)
    clauses: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    reason_text: str = Field(sa_column=Column(Text, nullable=False))
    refund_cents: int = 0
    restocking_fee_cents: int = 0
    received_unopened: int | None = None
    received_opened: int | None = None
    received_damaged: int | None = None
    received_missing: int | None = None
    settled_refund_cents: int | None = None
    settled_fee_cents: int | None = None
    replacement_units: int | None = None
    settlement_note: str | None = Field(default=None, sa_column=Column(Text))


class Transition(SQLModel, table=True):
    """Append-only audit log: every state change, who made it, and the facts it used."""

    __tablename__ = "transitions"
    id: int | None = Field(default=None, primary_key=True)
    return_id: int = Field(foreign_key="returns.id", index=True)
    from_state: State | None = Field(default=None, sa_column=Column(EnumText(State, 20), nullable=True))
    to_state: State = enum_column(State, 20)
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    actor: str = Field(max_length=80)
    flow_run_id: str | None = Field(default=None, max_length=64)
    facts: dict[str, object] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Refund(SQLModel, table=True):
    """One refund per return, keyed `refund:<RMA>`; its allocations say which payment got what (R10)."""

    __tablename__ = "refunds"
    id: int | None = Field(default=None, primary_key=True)
    return_id: int = Field(foreign_key="returns.id", unique=True)
    idempotency_key: str = Field(unique=True, max_length=64)
    amount_cents: int
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class RefundAllocation(SQLModel, table=True):
    __tablename__ = "refund_allocations"
    __table_args__ = (UniqueConstraint("refund_id", "payment_id"),)
    id: int | None = Field(default=None, primary_key=True)
    refund_id: int = Field(foreign_key="refunds.id", index=True)
    payment_id: int = Field(foreign_key="payments.id", index=True)
    amount_cents: int
    gateway_reference: str = Field(max_length=80)


class GatewaySettlement(SQLModel, table=True):
    """The ledger gateway's own book: what it paid out, once per idempotency key."""

    __tablename__ = "gateway_settlements"
    id: int | None = Field(default=None, primary_key=True)
    idempotency_key: str = Field(unique=True, max_length=96)
    payment_id: int = Field(foreign_key="payments.id", index=True)
    amount_cents: int
    settled_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class ProviderRefund(SQLModel, table=True):
    """A refund asked of a payment provider, one row per attempt: its reference and the status it last reported.

    The provider is the book here; this row is our memory of it, so a retry asks about the refund instead of
    paying again, and a pending refund is asked about until it settles."""

    __tablename__ = "provider_refunds"
    __table_args__ = (UniqueConstraint("return_id", "payment_id", "attempt"),)
    id: int | None = Field(default=None, primary_key=True)
    return_id: int = Field(foreign_key="returns.id", index=True)
    payment_id: int = Field(foreign_key="payments.id", index=True)
    attempt: int = 1  # a new attempt only after a person looked at a failed one
    idempotency_key: str = Field(unique=True, max_length=96)
    provider: str = Field(max_length=20)
    provider_ref: str | None = Field(default=None, max_length=80)  # None: refused before the provider made one
    amount_cents: int
    status: str = Field(max_length=20)  # pending | succeeded | failed | canceled | requires_action
    failure_reason: str | None = Field(default=None, sa_column=Column(Text))
    reviews_seen: int = 0  # operator authorizations of the return when this attempt was made
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class ProviderEventIn(SQLModel, table=True):
    """A payment provider's webhook event we verified and acted on, once: a redelivery finds its row and is ignored.

    Ids only: the event's body (which may name the customer) is never kept."""

    __tablename__ = "provider_events"
    __table_args__ = (UniqueConstraint("provider", "event_id"),)
    id: int | None = Field(default=None, primary_key=True)
    provider: str = Field(max_length=20)
    event_id: str = Field(max_length=80)
    type: str = Field(max_length=80)
    provider_ref: str | None = Field(default=None, max_length=80)  # the refund the event is about, if any
    rma: str | None = Field(default=None, max_length=16)  # the return it re-drove, if any
    received_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class Escalation(SQLModel, table=True):
    """A return escalated to Customer Care by an automation, once: the unique return id makes a second firing (a
    redelivered event, or the overdue flag and a failed run both) find this row instead of escalating again."""

    __tablename__ = "escalations"
    id: int | None = Field(default=None, primary_key=True)
    return_id: int = Field(foreign_key="returns.id", unique=True)
    rma: str = Field(max_length=16)
    cause: str = Field(max_length=40)  # the Prefect event that fired it: returns.overdue, prefect.flow-run.Failed
    source: str | None = Field(default=None, max_length=80)  # the failed flow run's id, if a run failed
    escalated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class OutboxMessage(SQLModel, table=True):
    """Transactional outbox: written with the state change that causes it; the relay delivers it."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "status", "next_attempt_at"),)
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True, max_length=128)  # "<return id>:<kind>" - one message per (return, kind)
    return_id: int | None = Field(default=None, foreign_key="returns.id", index=True)
    kind: MessageKind = enum_column(MessageKind, 40)
    recipient: str = Field(max_length=254)
    context: dict[str, object] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    message_id: str = Field(max_length=200)
    status: OutboxStatus = Field(default=OutboxStatus.PENDING,
                                 sa_column=Column(EnumText(OutboxStatus, 10), nullable=False))
    attempts: int = 0
    next_attempt_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    sent_at: datetime | None = ts()


class ApiKey(SQLModel, table=True):
    """A storefront's key: only its SHA-256 is kept, so a database leak reveals no usable key."""

    __tablename__ = "api_keys"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)
    key_hash: str = Field(unique=True, max_length=64)
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    revoked_at: datetime | None = ts()


class ApiRequest(SQLModel, table=True):
    """A storefront's request that passed R13, keyed by (key, Idempotency-Key); the request flow reads it by id, so
    no email address travels through Prefect. `request` is the request without the email."""

    __tablename__ = "api_requests"
    __table_args__ = (UniqueConstraint("api_key_id", "idempotency_key"),)
    id: int | None = Field(default=None, primary_key=True)
    reference: str = Field(unique=True, max_length=40)  # the public id in status URLs (not guessable)
    api_key_id: int | None = Field(default=None, foreign_key="api_keys.id", index=True)
    idempotency_key: str = Field(max_length=128)
    body_hash: str = Field(max_length=64)
    order_number: str = Field(foreign_key="orders.number", index=True, max_length=64)
    request: dict[str, object] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    flow_run_id: str | None = Field(default=None, max_length=64)
    response: dict[str, object] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class WebhookEndpoint(SQLModel, table=True):
    """Where transitions are POSTed; the secret signs each delivery (HMAC-SHA256), so it is kept as issued."""

    __tablename__ = "webhook_endpoints"
    id: int | None = Field(default=None, primary_key=True)
    url: str = Field(max_length=254)
    secret: str = Field(max_length=80)
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    disabled_at: datetime | None = ts()
