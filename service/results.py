"""Typed values passed between the steps of a stage; JSON only at the edges (`to_json`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from models.policy import Allocation, Outcome, Settlement
from models.states import State
from models.tables import Return


@dataclass(frozen=True)
class Decided:
    """A stored request: its decision (R14), the RMA when one was issued or reserved for review."""

    return_id: int
    rma_number: str | None
    state: State
    outcome: Outcome
    refund_total: Decimal
    clauses: tuple[str, ...]
    replayed: bool
    decision: Mapping[str, Any]  # the stored decision: per-line outcome, clauses and reasons

    @property
    def authorized(self) -> bool:
        return self.state is State.AUTHORIZED

    def to_json(self) -> dict[str, Any]:
        return {"rma_number": self.rma_number, "state": str(self.state), "return_id": self.return_id,
                "replayed": self.replayed} | dict(self.decision)


@dataclass(frozen=True)
class Accepted:
    """A storefront's request that passed R13, stored under its Idempotency-Key; `parameters` are the request
    flow's: the request and its reference, no email address."""

    reference: str
    order_number: str
    parameters: Mapping[str, Any]
    flow_run_id: str | None
    response: Mapping[str, Any] | None
    replayed: bool


@dataclass(frozen=True)
class Moved:
    """Where a return stands after a stage that moved it (receipt, review, cancel)."""

    rma_number: str
    state: State
    deadline: datetime | None = None
    return_id: int | None = field(default=None, compare=False)  # for the next step; not part of the answer

    @classmethod
    def of(cls, ret: Return) -> Moved:
        assert ret.rma is not None
        return cls(ret.rma, State(ret.state), ret.deadline_at, ret.id)

    def to_json(self) -> dict[str, Any]:
        return {"rma_number": self.rma_number, "state": str(self.state),
                "deadline": self.deadline.isoformat() if self.deadline else None}


@dataclass(frozen=True)
class PlannedRefund:
    """What processing will pay: the settlement and its split over payments (R10), from stored facts."""

    rma: str
    return_id: int
    settlement: Settlement
    allocations: tuple[Allocation, ...]

    def key(self, payment_id: int) -> str:
        """The gateway key: the same on every retry of this return's refund to this payment."""
        return f"refund:{self.rma}:{payment_id}"


@dataclass(frozen=True)
class Payout:
    """A plan and what the gateway answered for each of its payments; handed on to completion, not recomputed.
    Completion needs every payment paid: a provider may still be `waiting` on some, or report `failures`."""

    plan: PlannedRefund
    references: Mapping[int, str]
    waiting: tuple[str, ...] = ()  # provider references of refunds still pending
    failures: tuple[str, ...] = ()  # the providers' reasons, for the operator the return is parked for


@dataclass(frozen=True)
class Completed:
    """A processed return: the refund paid (or zero for a replacement) and its split over the payments."""

    rma_number: str
    refund_total: Decimal
    allocations: tuple[Allocation, ...]
    state: State = State.COMPLETED
    return_id: int | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"rma_number": self.rma_number, "state": str(self.state), "refund_total": str(self.refund_total),
                "payments": [{"payment_id": a.payment_id, "amount": str(a.amount)} for a in self.allocations]}


@dataclass(frozen=True)
class SweepPlan:
    """The RMAs a sweep must act on at its `as_of`."""

    expire: list[str] = field(default_factory=list)
    due_soon: list[str] = field(default_factory=list)
    overdue: list[str] = field(default_factory=list)
    redrive: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did, by RMA (ids only)."""

    as_of: datetime
    expired: list[str]
    due_soon: list[str]
    overdue: list[str]
    processed: list[str]
    labels: list[str]

    ACTIONS = ("expired", "due_soon", "overdue", "processed", "labels")

    def rows(self) -> list[dict[str, str]]:
        """One row per action taken, for the run's table artifact."""
        return [{"action": action, "rma": rma} for action in self.ACTIONS for rma in getattr(self, action)]

    @classmethod
    def from_rows(cls, as_of: datetime, rows: list[dict[str, str]]) -> SweepReport:
        lists: dict[str, list[str]] = {a: [] for a in cls.ACTIONS}
        for row in rows:
            lists[row["action"]].append(row["rma"])
        return cls(as_of=as_of, **lists)

    def to_json(self) -> dict[str, Any]:
        return {"as_of": self.as_of.isoformat()} | {a: list(getattr(self, a)) for a in self.ACTIONS}


@dataclass(frozen=True)
class BoardRow:
    """One return on a list of the board: ids and the columns that list shows (no personal data)."""

    rma: str
    order_number: str
    since: datetime | None = None  # in review since, expired at, escalated at
    deadline: datetime | None = None  # the processing deadline (R9), or the RMA's validity (R8)
    why: str = ""  # why it waits for a person: the review's reasons, the escalation's cause

    def to_json(self) -> dict[str, Any]:
        return {"rma": self.rma, "order_number": self.order_number, "why": self.why,
                "since": self.since.isoformat() if self.since else None,
                "deadline": self.deadline.isoformat() if self.deadline else None}


@dataclass(frozen=True)
class Board:
    """What waits for a person at `as_of`: counts per state; in review, due soon, overdue, stuck, RMAs about to
    expire, RMAs expired within the week, escalated returns; and, apart from the stuck ones, the refunds a
    provider has not settled yet."""

    as_of: datetime
    counts: Mapping[str, int]
    due_soon: list[str]
    overdue: list[str]
    stuck: list[str]
    in_review: list[BoardRow] = field(default_factory=list)
    expiring: list[BoardRow] = field(default_factory=list)
    expired: list[BoardRow] = field(default_factory=list)
    escalated: list[BoardRow] = field(default_factory=list)
    deadlines: Mapping[str, datetime] = field(default_factory=dict)  # of the due-soon, overdue and stuck ones
    awaiting_provider: list[str] = field(default_factory=list)  # processing, a refund pending at its provider

    def to_json(self) -> dict[str, Any]:
        return {"as_of": self.as_of.isoformat(), "counts": dict(self.counts), "due_soon": self.due_soon,
                "overdue": self.overdue, "stuck": self.stuck, "awaiting_provider": self.awaiting_provider} | {
            name: [r.to_json() for r in getattr(self, name)]
            for name in ("in_review", "expiring", "expired", "escalated")}
