"""The numbers an operator asks for over a period, and the CSV export of its returns; ids and amounts only."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Engine, func, select
from sqlmodel import col

from adapters.db import unit_of_work
from models.money import from_cents
from models.policy import Outcome, Policy
from models.states import State
from models.tables import Order, OrderLine, Refund, Return, ReturnLine, Transition
from models.whatif import Period
from service.returns import units_held
from service.whatif import in_period


def last_week(policy: Policy, now: datetime) -> Period:
    """The seven whole days before today, in the shop's time zone (the weekly run's period)."""
    today = policy.local_date(now)
    return Period(today - timedelta(days=7), today - timedelta(days=1))


def nearest_rank(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile of `values` (None for none): the smallest value with `share` at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@dataclass(frozen=True)
class SkuRate:
    sku: str
    sold: int
    returned: int

    @property
    def rate(self) -> float:
        return self.returned / self.sold if self.sold else 0.0


@dataclass(frozen=True)
class Report:
    """What happened to returns over a period; every count is of transitions or rows inside it."""

    period: Period
    processing_days: int
    requested: int
    authorized: int
    declined: int
    review: int
    completed: int
    expired: int
    declined_lines: dict[str, int]  # per clause cited: lines declined at request in the period
    reasons: dict[str, int]
    refunds_paid: Decimal
    restocking_fees: Decimal
    rates: tuple[SkuRate, ...]
    processing_days_taken: tuple[float, ...]  # receipt to completion, days, per return completed in the period
    on_time: int  # completed within the P8 deadline stored at receipt
    expired_rmas: tuple[str, ...] = field(default=())

    def processing(self) -> dict[str, Any]:
        taken = list(self.processing_days_taken)

        def rounded(x: float | None) -> float | None:
            return None if x is None else round(x, 2)

        return {"returns": len(taken), "p50_days": rounded(nearest_rank(taken, 0.5)),
                "p90_days": rounded(nearest_rank(taken, 0.9)), "max_days": rounded(max(taken) if taken else None),
                "within_deadline": self.on_time,
                "share_within_deadline": round(self.on_time / len(taken), 4) if taken else None}

    def to_json(self) -> dict[str, Any]:
        return {
            "period": self.period.to_json(), "requested": self.requested, "authorized": self.authorized,
            "declined": self.declined, "review": self.review, "completed": self.completed,
            "expired": self.expired, "declined_lines_per_clause": self.declined_lines, "reasons": self.reasons,
            "refunds_paid": str(self.refunds_paid), "restocking_fees": str(self.restocking_fees),
            "return_rate_per_sku": [{"sku": r.sku, "sold": r.sold, "returned": r.returned,
                                     "rate": round(r.rate, 4)} for r in self.rates],
            "receipt_to_processed": self.processing(), "processing_days": self.processing_days,
            "expired_rmas": list(self.expired_rmas),
        }


def _arrivals(engine: Engine, period: Period, policy: Policy) -> dict[State, list[int]]:
    """The returns that entered each state in the period (from the audit log)."""
    with unit_of_work(engine, read_only=True) as session:
        rows = session.execute(select(col(Transition.to_state), col(Transition.return_id))
                               .where(*in_period(period, policy, Transition.at)))
        out: dict[State, list[int]] = {}
        for state, return_id in rows:
            out.setdefault(State(state), []).append(int(return_id))
    return {state: sorted(set(ids)) for state, ids in out.items()}


def report(engine: Engine, policy: Policy, period: Period) -> Report:
    """The period's numbers; reads only."""
    arrived = _arrivals(engine, period, policy)
    with unit_of_work(engine, read_only=True) as session:
        requested = list(session.scalars(select(Return).where(*in_period(period, policy, Return.requested_at))))
        declined_lines: Counter[str] = Counter()
        for ret in requested:
            for decided in cast(list[dict[str, Any]], ret.decision.get("lines", [])):
                if decided["decision"] == Outcome.DECLINED:
                    declined_lines[" ".join(decided["clauses"])] += 1
        completed = list(session.scalars(select(Return).where(
            col(Return.state) == State.COMPLETED, *in_period(period, policy, Return.completed_at))))
        done_ids = [r.id for r in completed]
        refunds = session.scalar(select(func.coalesce(func.sum(Refund.amount_cents), 0))
                                 .where(col(Refund.return_id).in_(done_ids))) or 0
        fees = session.scalar(select(func.coalesce(func.sum(ReturnLine.settled_fee_cents), 0))
                              .where(col(ReturnLine.return_id).in_(done_ids))) or 0
        taken = tuple((r.completed_at - r.received_at).total_seconds() / 86400 for r in completed
                      if r.completed_at and r.received_at)
        on_time = sum(1 for r in completed if r.completed_at and r.deadline_at and r.completed_at <= r.deadline_at)
        sold_lines = list(session.scalars(select(OrderLine).join(Order, col(Order.number) == OrderLine.order_number)
                                          .where(*in_period(period, policy, Order.placed_at))))
        held = units_held(session, [ln.id for ln in sold_lines if ln.id is not None])
        sold: Counter[str] = Counter()
        returned: Counter[str] = Counter()
        for ln in sold_lines:
            sold[ln.sku] += ln.quantity
            returned[ln.sku] += held.get(ln.id or 0, 0)
        expired_ids = arrived.get(State.EXPIRED, [])
        expired_rmas = tuple(sorted(str(r) for r in session.scalars(
            select(col(Return.rma)).where(col(Return.id).in_(expired_ids)))))
    rates = tuple(sorted((SkuRate(sku, n, returned[sku]) for sku, n in sold.items()),
                         key=lambda r: (-r.rate, r.sku)))
    return Report(
        period=period, processing_days=policy.processing_days, requested=len(requested),
        authorized=len(arrived.get(State.AUTHORIZED, [])), declined=len(arrived.get(State.DECLINED, [])),
        review=len(arrived.get(State.REVIEW, [])), completed=len(completed), expired=len(expired_ids),
        declined_lines=dict(sorted(declined_lines.items())),
        reasons=dict(sorted(Counter(str(r.reason) for r in requested).items())),
        refunds_paid=from_cents(int(refunds)), restocking_fees=from_cents(int(fees)), rates=rates,
        processing_days_taken=taken, on_time=on_time, expired_rmas=expired_rmas,
    )


# ---- the CSV export ---------------------------------------------------------------------------------------

CSV_COLUMNS = ("rma", "order_number", "requested_at", "state", "reason", "resolution", "decision", "sku", "quantity",
               "line_decision", "basis", "clauses", "refund", "restocking_fee", "settled_refund", "settled_fee",
               "rma_issued_at", "rma_expires_at", "received_at", "deadline_at", "completed_at")


def _iso(moment: datetime | None) -> str:
    return moment.isoformat() if moment else ""


def _cents(cents: int | None) -> str:
    return "" if cents is None else str(from_cents(cents))


def export_csv(engine: Engine, policy: Policy, period: Period) -> str:
    """One row per line of every return requested in the period: ids, dates, decisions and amounts, no names."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    with unit_of_work(engine, read_only=True) as session:
        query = (select(Return, ReturnLine).join(ReturnLine, col(ReturnLine.return_id) == Return.id)
                 .where(*in_period(period, policy, Return.requested_at))
                 .order_by(col(Return.requested_at), col(Return.id), col(ReturnLine.id)))
        for ret, ln in session.execute(query).tuples():
            writer.writerow({
                "rma": ret.rma or "", "order_number": ret.order_number, "requested_at": _iso(ret.requested_at),
                "state": str(ret.state), "reason": str(ret.reason), "resolution": str(ret.resolution),
                "decision": str(ret.decision.get("decision", "")), "sku": ln.sku, "quantity": ln.quantity,
                "line_decision": str(ln.outcome), "basis": str(ln.basis), "clauses": " ".join(ln.clauses),
                "refund": _cents(ln.refund_cents), "restocking_fee": _cents(ln.restocking_fee_cents),
                "settled_refund": _cents(ln.settled_refund_cents), "settled_fee": _cents(ln.settled_fee_cents),
                "rma_issued_at": _iso(ret.rma_issued_at), "rma_expires_at": _iso(ret.rma_expires_at),
                "received_at": _iso(ret.received_at), "deadline_at": _iso(ret.deadline_at),
                "completed_at": _iso(ret.completed_at),
            })
    return out.getvalue()


def period_of(since: date | None, until: date | None, policy: Policy, now: datetime) -> Period:
    """The period asked for; with neither end given, last week."""
    return Period(since, until) if since or until else last_week(policy, now)
