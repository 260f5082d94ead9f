"""The what-if: every stored request of a period re-decided under a candidate policy, reading only; one
implementation for the `policy-what-if` flow and `returns what-if`."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, select
from sqlmodel import Session, col

from adapters.db import unit_of_work
from models import policy as pol
from models.money import from_cents
from models.policy import Policy
from models.states import State
from models.tables import Order, Product, Return, ReturnLine
from models.whatif import Period, PolicyChangesIn, StoredRequest, WhatIf, candidate, replay_all
from service import returns as svc


def in_period(period: Period, policy: Policy, column: Any) -> list[ColumnElement[bool]]:
    """WHERE clauses putting a timestamp column inside the period's [start, end)."""
    start, end = period.bounds(policy)
    return ([col(column) >= start] if start else []) + ([col(column) < end] if end else [])


def stored_request(session: Session, ret: Return) -> StoredRequest:
    """The request as it was decided: its lines, and the order's facts read the way the request stage read them."""
    order = session.get(Order, ret.order_number)
    assert order is not None
    order_facts, facts, _ = svc._facts(session, order)
    if order_facts.delivered_at is not None and order_facts.delivered_at > ret.requested_at:
        # A delivery time imported after the request was not a fact the request was decided on (P5, R15).
        order_facts = replace(order_facts, delivered_at=None)
    lines = list(session.scalars(select(ReturnLine).where(col(ReturnLine.return_id) == ret.id)
                                 .order_by(col(ReturnLine.id))))
    wanted = {ln.exchange_sku for ln in lines if ln.exchange_sku}
    prices = {p.sku: from_cents(p.price_cents) if p.price_cents is not None else None
              for p in session.scalars(select(Product).where(col(Product.sku).in_(wanted)))}
    request = pol.ReturnRequest(
        reason=pol.Reason(ret.reason), resolution=pol.Resolution(ret.resolution),
        lines=tuple(pol.RequestedLine(ln.sku, ln.quantity, ln.unopened_declared, ln.exchange_sku) for ln in lines))
    return StoredRequest(
        rma=ret.rma, order_number=ret.order_number, requested_at=ret.requested_at, request=request,
        order=order_facts, lines=facts, exchange_prices=prices, decision=dict(ret.decision),
        rma_issued_at=ret.rma_issued_at, rma_expires_at=ret.rma_expires_at, received_at=ret.received_at,
        deadline_at=ret.deadline_at, completed_at=ret.completed_at,
        awaiting_parcel=ret.received_at is None and ret.state in (State.AUTHORIZED, State.EXPIRED),
        expired=ret.state == State.EXPIRED)


def what_if(engine: Engine, base: Policy, changes: PolicyChangesIn, period: Period, as_of: datetime) -> WhatIf:
    """Replay the period's stored requests (by request date) under the base policy with `changes`; writes nothing."""
    cand = candidate(base, changes)
    with unit_of_work(engine, read_only=True) as session:
        query = (select(Return).where(*in_period(period, base, Return.requested_at))
                 .order_by(col(Return.requested_at), col(Return.id)))
        stored = [stored_request(session, ret) for ret in session.scalars(query)]
    return replay_all(base, cand, period, stored, as_of)
