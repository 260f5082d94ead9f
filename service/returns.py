"""Units of work for every stage of a return. Each takes a session and never commits (the caller does)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from jinja2 import TemplateError
from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col

from adapters.config import Settings, Shop
from adapters.mail.message import subject_line
from models import policy as pol
from models.errors import InvalidInput, NotFound, StaleState
from models.money import from_cents, parse_amount, to_cents
from models.notices import CUSTOMER_KINDS, MessageKind
from models.policy import Outcome, Policy
from models.rma import new_rma, parse_rma
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn
from models.states import TERMINAL, State, check_transition
from models.tables import (
    Customer,
    GatewaySettlement,
    Order,
    OrderLine,
    OutboxMessage,
    Payment,
    Product,
    Refund,
    RefundAllocation,
    Return,
    ReturnLine,
    Transition,
)
from service.outbox import enqueue
from service.refunds import paid_out, refunded_elsewhere
from service.results import Decided, PlannedRefund, SweepPlan
from service.storefront import enqueue_transition

# States whose lines still hold units of the order line (R11): open returns and completed ones.
HOLDS_UNITS = frozenset({State.REQUESTED, State.REVIEW, State.AUTHORIZED, State.RECEIVED,
                         State.PROCESSING, State.COMPLETED})
SAME_ANSWER_FOR_R13 = "no order matches that order number and email address"


@dataclass(frozen=True)
class Actor:
    """Who makes a change: `api`, `operator:<name>`, `sweep`; and the Prefect flow run, if any."""

    name: str
    flow_run_id: str | None = None

    @classmethod
    def operator(cls, name: str) -> Actor:
        return cls(f"operator:{name}")

    def in_run(self, flow_run_id: str | None) -> Actor:
        """The same actor, acting inside a Prefect flow run (its id goes on the audit rows)."""
        return Actor(self.name, flow_run_id)


# ---- import ----------------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    products: int = 0
    customers: int = 0
    orders_added: int = 0
    orders_updated: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def import_data(session: Session, data: ImportIn) -> ImportReport:
    """Upsert products and customers by key; add orders by number (an existing order only gains a delivery time)."""
    report = ImportReport()
    for p in data.products:
        price = to_cents(parse_amount(p.price, "price")) if p.price is not None else None
        session.merge(Product(sku=p.sku, name=p.name, kind=p.kind, size=p.size, final_sale=p.final_sale,
                              price_cents=price))
        report.products += 1
    for c in data.customers:
        a = c.address
        session.merge(Customer(account=c.account, name=c.name, email=c.email, line1=a.line1, line2=a.line2,
                               city=a.city, region=a.region, postal_code=a.postal_code, country=a.country))
        report.customers += 1
    session.flush()
    for o in data.orders:
        if session.get(Customer, o.account) is None:
            raise InvalidInput(f"order {o.number}: unknown account {o.account}")
        existing = session.get(Order, o.number)
        if existing is not None:
            if existing.account != o.account:
                raise InvalidInput(f"order {o.number} already exists for another account")
            if o.delivered_at is not None and existing.delivered_at != o.delivered_at:
                existing.delivered_at = o.delivered_at
                report.orders_updated += 1
            continue
        skus = [ln.sku for ln in o.lines]
        if len(set(skus)) != len(skus):
            raise InvalidInput(f"order {o.number}: a sku appears on two lines; merge them")
        session.add(Order(number=o.number, account=o.account, channel=o.channel, placed_at=o.placed_at,
                          delivered_at=o.delivered_at))
        for ln in o.lines:
            if session.get(Product, ln.sku) is None:
                raise InvalidInput(f"order {o.number}: unknown sku {ln.sku}")
            session.add(OrderLine(order_number=o.number, sku=ln.sku, quantity=ln.quantity,
                                  unit_price_cents=to_cents(parse_amount(ln.unit_price, "unit_price")),
                                  unit_tax_cents=to_cents(parse_amount(ln.unit_tax, "unit_tax")),
                                  expires_on=ln.expires_on))
        for seq, pay in enumerate(o.payments, start=1):
            session.add(Payment(order_number=o.number, seq=seq, method=pay.method,
                                amount_cents=to_cents(parse_amount(pay.amount, "amount")), last4=pay.last4,
                                captured_at=pay.captured_at, provider=pay.provider or "ledger",
                                reference=pay.reference))
        report.orders_added += 1
        session.flush()
    return report


# ---- facts -----------------------------------------------------------------------------------------------


def _order_for_request(session: Session, req: ReturnRequestIn) -> tuple[Order, Customer]:
    """R13: the order exists and the email is its account's main contact; both failures answer alike."""
    return owner_of(session, req.order_number, req.email)


def owner_of(session: Session, order_number: str, email: str) -> tuple[Order, Customer]:
    """R13 alone (a request, a shopper's look-up): NotFound, one message for an unknown order or a wrong email."""
    order = session.get(Order, order_number)
    # Look an account up even for an unknown order: both refusals run the same statements, so neither the answer
    # nor the time it takes tells a prober which order numbers exist.
    customer = session.get(Customer, order.account if order is not None else "")
    if order is None or customer is None or customer.email.casefold() != email.casefold():
        raise NotFound(SAME_ANSWER_FOR_R13)
    return order, customer


def _lock_order(session: Session, number: str) -> None:
    """Serialize the writers of one order on PostgreSQL, where two READ COMMITTED transactions would both see the
    same units free (R11) or the same payment room (R10); SQLite's BEGIN IMMEDIATE already serializes writers."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(col(Order.number)).where(col(Order.number) == number).with_for_update())


def _another_in_processing(session: Session, ret: Return) -> bool:
    """Whether another return of the same order is being processed. Its refunds share the order's payments (R10):
    processing them one at a time keeps every plan's allocation from going stale under the other's completion."""
    _lock_order(session, ret.order_number)
    return session.scalars(select(col(Return.id)).where(
        col(Return.order_number) == ret.order_number, col(Return.id) != ret.id,
        col(Return.state) == State.PROCESSING)).first() is not None


def units_held(session: Session, order_line_ids: list[int]) -> dict[int, int]:
    """Units of each order line already on open or completed returns (R11)."""
    if not order_line_ids:
        return {}
    rows = session.execute(
        select(col(ReturnLine.order_line_id), func.sum(ReturnLine.quantity))
        .join(Return, col(Return.id) == ReturnLine.return_id)
        .where(col(ReturnLine.order_line_id).in_(order_line_ids))
        .where(col(Return.state).in_(list(HOLDS_UNITS)))
        .where(col(ReturnLine.outcome) != Outcome.DECLINED)
        .group_by(col(ReturnLine.order_line_id))
    ).all()
    return {int(r[0]): int(r[1]) for r in rows}


def _facts(session: Session, order: Order) -> tuple[pol.OrderFacts, dict[str, pol.LineFacts], dict[str, OrderLine]]:
    lines = list(session.scalars(select(OrderLine).where(col(OrderLine.order_number) == order.number)))
    held = units_held(session, [ln.id for ln in lines if ln.id is not None])
    skus = [ln.sku for ln in lines]
    products = {p.sku: p for p in session.scalars(select(Product).where(col(Product.sku).in_(skus)))}
    facts = {
        ln.sku: pol.LineFacts(
            sku=ln.sku, product_name=products[ln.sku].name, kind=products[ln.sku].kind, size=products[ln.sku].size,
            final_sale=products[ln.sku].final_sale, quantity_shipped=ln.quantity,
            quantity_available=ln.quantity - held.get(ln.id or 0, 0), unit_price=from_cents(ln.unit_price_cents),
            unit_tax=from_cents(ln.unit_tax_cents), expires_on=ln.expires_on,
        )
        for ln in lines
    }
    order_facts = pol.OrderFacts(order.number, order.channel, order.placed_at, order.delivered_at)
    return order_facts, facts, {ln.sku: ln for ln in lines}


def units_left(session: Session, order_number: str) -> list[dict[str, Any]]:
    """Each line of the order: its product and how many units can still be returned (R11)."""
    order = session.get(Order, order_number)
    if order is None:
        raise NotFound(SAME_ANSWER_FOR_R13)
    _, facts, _ = _facts(session, order)
    return [{"sku": f.sku, "name": f.product_name, "quantity_shipped": f.quantity_shipped,
             "quantity_left": f.quantity_available} for f in facts.values()]


def order_returns(session: Session, order_number: str) -> list[Return]:
    """The order's returns, oldest first; NotFound for an unknown order."""
    if session.get(Order, order_number) is None:
        raise NotFound(f"no order has number {order_number}")
    query = select(Return).where(col(Return.order_number) == order_number).order_by(col(Return.id))
    return list(session.scalars(query))


def _to_request(req: ReturnRequestIn) -> pol.ReturnRequest:
    reason = pol.Reason(req.reason)
    resolution = pol.Resolution(req.resolution) if req.resolution else pol.DEFAULT_RESOLUTION[reason]
    return pol.ReturnRequest(
        reason=reason, resolution=resolution,
        lines=tuple(pol.RequestedLine(ln.sku, ln.quantity, ln.unopened, ln.exchange_sku) for ln in req.lines),
    )


def quote(session: Session, req: ReturnRequestIn, now: datetime, policy: Policy) -> pol.Decision:
    """Decide a request from stored facts without writing anything."""
    order, _ = _order_for_request(session, req)
    order_facts, facts, _ = _facts(session, order)
    request = _to_request(req)
    wanted = {ln.sku for ln in request.lines} | {ln.exchange_sku for ln in request.lines if ln.exchange_sku}
    known = {p.sku: p for p in session.scalars(select(Product).where(col(Product.sku).in_(wanted)))}
    pol.validate_request(request, facts, frozenset(known))
    prices = {sku: from_cents(p.price_cents) if p.price_cents is not None else None for sku, p in known.items()}
    return pol.decide(policy, order_facts, facts, request, now, prices)


# ---- transitions -----------------------------------------------------------------------------------------


def _id(row: Any) -> int:
    """The primary key of a row that has been flushed (SQLModel types it Optional until then)."""
    assert row.id is not None
    return int(row.id)


def _updated(session: Session, statement: Any) -> int:
    """Run a compare-and-set UPDATE (the session's copies are left as they are); how many rows it changed."""
    result = cast(CursorResult[Any], session.execute(statement.execution_options(synchronize_session=False)))
    return int(result.rowcount)


def transition(
    session: Session, ret: Return, target: State, now: datetime, actor: Actor,
    facts: dict[str, Any] | None = None, **values: Any,
) -> None:
    """Compare-and-set the state (plus `values`) and append the audit row, in the caller's transaction."""
    current = State(ret.state)
    check_transition(current, target, received=ret.received_at is not None or "received_at" in values)
    changed = _updated(session, update(Return).where(col(Return.id) == ret.id, col(Return.state) == current)
                       .values(state=target, updated_at=now, **values))
    if changed != 1:
        raise StaleState(f"return {ret.rma or ret.id} is no longer '{current}'")
    row = Transition(return_id=_id(ret), from_state=current, to_state=target, at=now,
                     actor=actor.name, flow_run_id=actor.flow_run_id, facts=facts or {})
    session.add(row)
    session.flush()
    _written(ret, state=target, updated_at=now, **values)
    enqueue_transition(session, ret, current, _id(row), now)  # the storefronts' webhooks, in this same transaction


def _written(ret: Return, **values: Any) -> None:
    """Bring the loaded return up to what an UPDATE just wrote, without reading it back (nor marking it dirty)."""
    for name, value in values.items():
        set_committed_value(ret, name, value)


def load_return(session: Session, rma_text: str, *, for_update: bool = False) -> Return:
    """The return with this RMA; InvalidInput for a mistyped number, NotFound for an unknown one."""
    rma = parse_rma(rma_text)
    stmt = select(Return).where(col(Return.rma) == rma)
    if for_update and session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    ret = session.scalars(stmt).first()
    if ret is None:
        raise NotFound(f"no return has RMA {rma}")
    return ret


def _unique_rma(session: Session) -> str:
    for _ in range(20):
        rma = new_rma()
        if session.scalars(select(col(Return.id)).where(col(Return.rma) == rma)).first() is None:
            return rma
    raise RuntimeError("could not draw an unused RMA number")  # pragma: no cover - 32^6 numbers


# ---- emails (the outbox rows a transition requires) ------------------------------------------------------


def _names(session: Session, skus: set[str]) -> dict[str, str]:
    return {p.sku: p.name for p in session.scalars(select(Product).where(col(Product.sku).in_(skus)))}


def _customer(session: Session, ret: Return) -> Customer:
    order = session.get(Order, ret.order_number)
    assert order is not None
    customer = session.get(Customer, order.account)
    assert customer is not None
    return customer


def _order_lines(session: Session, order_number: str) -> dict[int | None, OrderLine]:
    return {ol.id: ol for ol in session.scalars(select(OrderLine).where(col(OrderLine.order_number) == order_number))}


def _lines(session: Session, ret: Return) -> list[ReturnLine]:
    return list(session.scalars(select(ReturnLine).where(col(ReturnLine.return_id) == ret.id)
                                .order_by(col(ReturnLine.id))))


def _email(session: Session, ret: Return, kind: str, context: dict[str, Any], now: datetime, settings: Settings,
           *, to_care: bool = False, occasion: str = "") -> None:
    """Enqueue one message per (return, kind[, occasion]) in the caller's transaction."""
    customer = _customer(session, ret)
    base = {"rma": ret.rma, "order_number": ret.order_number, "return_id": ret.id}
    if not to_care:
        base |= {"customer_name": customer.name, "account": customer.account}
    key = f"{ret.id}:{kind}" + (f":{occasion}" if occasion else "")
    enqueue(session, key=key, kind=MessageKind(kind), recipient=settings.care_address if to_care else customer.email,
            context=base | context, return_id=ret.id, now=now, domain=settings.shop.message_id_domain)


def label_file(rma: str) -> str:
    """Where an RMA's label lives, relative to RETURNS_HOME."""
    return f"labels/{rma}.pdf"


def _issue_context(session: Session, ret: Return, policy: Policy) -> dict[str, Any]:
    lines = _lines(session, ret)
    names = _names(session, {ln.sku for ln in lines})
    assert ret.rma is not None and ret.rma_expires_at is not None
    return {
        "lines": [{"sku": ln.sku, "name": names[ln.sku], "quantity": ln.quantity,
                   "refund": str(from_cents(ln.refund_cents)),
                   "restocking_fee": str(from_cents(ln.restocking_fee_cents)),
                   "basis": ln.basis, "clauses": ln.clauses}
                  for ln in lines if ln.outcome != Outcome.DECLINED],
        "declined_lines": [{"sku": ln.sku, "name": names[ln.sku], "quantity": ln.quantity, "reason": ln.reason_text,
                            "clauses": ln.clauses} for ln in lines if ln.outcome == Outcome.DECLINED],
        "refund_total": str(from_cents(ret.refund_total_cents)),
        "valid_until": policy.local_date(ret.rma_expires_at).isoformat(),
        "prepaid": ret.reason in (pol.Reason.DAMAGED, pol.Reason.SHIPPING_ERROR),
        "reason": ret.reason,
        "resolution": ret.resolution,
        "label_file": label_file(ret.rma),
    }


def _authorize(session: Session, ret: Return, now: datetime, actor: Actor, policy: Policy, settings: Settings,
               facts: dict[str, Any]) -> None:
    rma = ret.rma or _unique_rma(session)
    transition(session, ret, State.AUTHORIZED, now, actor, facts, rma=rma, rma_issued_at=now,
               rma_expires_at=policy.rma_valid_until(now))
    _email(session, ret, "rma_issued", _issue_context(session, ret, policy), now, settings)


def _decline(session: Session, ret: Return, now: datetime, actor: Actor, settings: Settings, facts: dict[str, Any],
             summary: str) -> None:
    transition(session, ret, State.DECLINED, now, actor, facts)
    lines = _lines(session, ret)
    names = _names(session, {ln.sku for ln in lines})
    _email(session, ret, "declined", {
        "lines": [{"sku": ln.sku, "name": names[ln.sku], "quantity": ln.quantity, "reason": ln.reason_text,
                   "clauses": ln.clauses} for ln in lines],
        "summary": summary,
    }, now, settings)


def _review(session: Session, ret: Return, now: datetime, actor: Actor, settings: Settings, facts: dict[str, Any],
            reasons: list[str]) -> None:
    transition(session, ret, State.REVIEW, now, actor, facts)
    # A return can need review twice: at request (e.g. no expiry, R2) and at receipt (R12).
    _email(session, ret, "review_needed", {"reasons": reasons}, now, settings, to_care=True,
           occasion="receipt" if ret.received_at else "request")


# ---- request ---------------------------------------------------------------------------------------------


def decided(ret: Return, replayed: bool = False) -> Decided:
    """The typed outcome of a stored request, from its row."""
    assert ret.id is not None
    d = ret.decision
    clauses = tuple(str(c) for c in cast(list[str], d.get("clauses", [])))
    return Decided(return_id=_id(ret), rma_number=ret.rma, state=ret.state, outcome=Outcome(str(d["decision"])),
                   refund_total=Decimal(str(d["refund_total"])), clauses=clauses, replayed=replayed, decision=d)


def request_return(session: Session, req: ReturnRequestIn, now: datetime, actor: Actor, policy: Policy,
                   settings: Settings) -> Decided:
    """Decide and store a request; authorized ones get an RMA; a repeated idempotency key returns the first."""
    order, _ = _order_for_request(session, req)
    _lock_order(session, order.number)  # concurrent requests for the last units: one wins, the other hears R11
    if req.idempotency_key:
        # Keys are scoped to the order (R13): another customer's key can neither collide nor reveal a return.
        prior = session.scalars(select(Return).where(col(Return.order_number) == order.number,
                                                     col(Return.idempotency_key) == req.idempotency_key)).first()
        if prior is not None:
            return decided(prior, replayed=True)
    decision = quote(session, req, now, policy)
    _, _, order_lines = _facts(session, order)
    ret = Return(order_number=order.number, idempotency_key=req.idempotency_key, reason=decision.reason,
                 resolution=decision.resolution, state=State.REQUESTED,
                 policy_version=decision.policy_version,
                 decision=decision.as_dict(), refund_total_cents=to_cents(decision.refund_total), requested_at=now,
                 updated_at=now)
    if decision.outcome is Outcome.REVIEW:
        ret.rma = _unique_rma(session)  # a reference for the operator; it is not issued until authorized
    session.add(ret)
    session.flush()
    session.add(Transition(return_id=_id(ret), from_state=None, to_state=State.REQUESTED, at=now, actor=actor.name,
                           flow_run_id=actor.flow_run_id,
                           facts={"request": req.model_dump(mode="json", exclude={"email"})}))
    for ld in decision.lines:
        session.add(ReturnLine(
            return_id=_id(ret), order_line_id=_id(order_lines[ld.sku]), sku=ld.sku, quantity=ld.quantity,
            unopened_declared=next(r.unopened for r in req.lines if r.sku == ld.sku), exchange_sku=ld.exchange_sku,
            outcome=ld.outcome, basis=ld.basis, clauses=list(ld.clauses), reason_text=ld.reason,
            refund_cents=to_cents(ld.refund), restocking_fee_cents=to_cents(ld.restocking_fee)))
    session.flush()
    facts = {"decision": str(decision.outcome), "clauses": list(decision.clauses), "policy_version": policy.version}
    if decision.outcome is Outcome.AUTHORIZED:
        _authorize(session, ret, now, actor, policy, settings, facts)
    elif decision.outcome is Outcome.DECLINED:
        _decline(session, ret, now, actor, settings, facts, decision.summary)
    else:
        _review(session, ret, now, actor, settings, facts,
                [f"{ln.sku}: {ln.reason}" for ln in decision.lines if ln.outcome is Outcome.REVIEW])
    return decided(ret)


# ---- receipt ---------------------------------------------------------------------------------------------


def settlement_for(session: Session, ret: Return, policy: Policy, approved: bool = False) -> pol.Settlement:
    """The settlement the stored receipt earns under the policy (R12), from stored facts only."""
    lines = [ln for ln in _lines(session, ret) if ln.outcome != Outcome.DECLINED]
    order_lines = _order_lines(session, ret.order_number)
    authorized = tuple(
        pol.AuthorizedLine(ln.sku, ln.quantity, pol.Basis(ln.basis),
                           from_cents(order_lines[ln.order_line_id].unit_price_cents),
                           from_cents(order_lines[ln.order_line_id].unit_tax_cents), from_cents(ln.refund_cents),
                           ln.exchange_sku)
        for ln in lines
    )
    counts = {ln.sku: pol.ReceivedCounts(ln.received_unopened or 0, ln.received_opened or 0,
                                         ln.received_damaged or 0, ln.received_missing or 0) for ln in lines}
    return pol.settle(policy, authorized, counts, pol.Resolution(ret.resolution), approved)


def _same_receipt(ret: Return, lines: dict[str, ReturnLine], receipt: ReceiptIn) -> bool:
    """Whether this exact receipt (time and counts) is the one already recorded on the return."""
    if ret.received_at is None or ret.received_at != receipt.received_at:
        return False
    try:
        given = receipt.counts({sku: ln.quantity for sku, ln in lines.items()})
    except InvalidInput:
        return False
    return all((ln.received_unopened, ln.received_opened, ln.received_damaged, ln.received_missing)
               == (c.unopened, c.opened, c.damaged, c.missing) for ln, c in ((lines[sku], given[sku]) for sku in lines))


def _not_awaiting(ret: Return, policy: Policy) -> str:
    """Why the dock cannot record a parcel for this return, in the words the dock needs."""
    state = State(ret.state)
    if ret.received_at is not None:
        return (f"{ret.rma} was received already, on {policy.local_date(ret.received_at)} (now '{state}'), "
                "not awaiting a parcel: a second box or a repeated scan goes to Customer Care")
    if state is State.EXPIRED and ret.rma_expires_at is not None:
        return (f"{ret.rma} expired on {policy.local_date(ret.rma_expires_at)} (R8), not awaiting a parcel: "
                "hold the parcel for Customer Care")
    return f"{ret.rma} is '{state}', not awaiting a parcel: hold it for Customer Care"


def receive(session: Session, receipt: ReceiptIn, now: datetime, actor: Actor, policy: Policy,
            settings: Settings) -> Return:
    """Log a parcel at Lantana with per-unit condition (SKUs not listed arrived unopened); starts the 10-day clock
    (P8, R9); may send it to review."""
    ret = load_return(session, receipt.rma, for_update=True)
    lines = {ln.sku: ln for ln in _lines(session, ret) if ln.outcome != Outcome.DECLINED}
    if ret.state != State.AUTHORIZED:
        if _same_receipt(ret, lines, receipt):
            return ret  # a retried or re-triggered receipt: recorded already, nothing to do twice
        raise InvalidInput(_not_awaiting(ret, policy))
    if receipt.received_at > now + timedelta(minutes=5):
        raise InvalidInput("received_at is in the future")
    assert ret.rma_issued_at is not None
    if receipt.received_at < ret.rma_issued_at:
        raise InvalidInput("received_at is before the RMA was issued")
    if ret.rma_expires_at is not None and receipt.received_at >= ret.rma_expires_at:
        # R8: the RMA lapsed before the parcel came; the sweep has not marked it expired yet.
        raise InvalidInput(f"{ret.rma} expired on {policy.local_date(ret.rma_expires_at)} (R8), before this parcel "
                           "arrived: hold the parcel for Customer Care")
    counts = receipt.counts({sku: ln.quantity for sku, ln in lines.items()})
    for sku, c in counts.items():
        line = lines[sku]
        line.received_unopened, line.received_opened = c.unopened, c.opened
        line.received_damaged, line.received_missing = c.damaged, c.missing
    session.flush()
    deadline = policy.processing_deadline(receipt.received_at)
    transition(session, ret, State.RECEIVED, now, actor,
               {"counts": {sku: asdict(c) for sku, c in counts.items()}},
               received_at=receipt.received_at, deadline_at=deadline)
    names = _names(session, set(lines))
    _email(session, ret, "received", {
        "received_on": policy.local_date(receipt.received_at).isoformat(),
        "process_by": policy.local_date(deadline).isoformat(),
        "lines": [{"sku": sku, "name": names[sku], "unopened": c.unopened, "opened": c.opened,
                   "damaged": c.damaged, "missing": c.missing} for sku, c in counts.items()],
    }, now, settings)
    settlement = settlement_for(session, ret, policy)
    if settlement.review:
        _review(session, ret, now, actor, settings, {"settlement": [ln.as_dict() for ln in settlement.lines]},
                [f"{ln.sku}: {ln.note}" for ln in settlement.lines if ln.review])
    return ret


# ---- processing ------------------------------------------------------------------------------------------


def claim(session: Session, ret: Return, now: datetime, actor: Actor, policy: Policy) -> Return | None:
    """Take the (loaded, locked) return for processing under a lease: received -> processing, or an expired
    lease re-taken."""
    lease = now + timedelta(minutes=policy.processing_lease_minutes)
    if ret.state == State.RECEIVED and _another_in_processing(session, ret):
        return None  # the sweep takes it once the other return of its order is done
    if ret.state == State.RECEIVED:
        transition(session, ret, State.PROCESSING, now, actor, {"lease_until": lease.isoformat()}, claimed_until=lease)
        return ret
    if ret.state == State.PROCESSING and (ret.claimed_until is None or ret.claimed_until <= now):
        changed = _updated(session, update(Return).where(
            col(Return.id) == ret.id, col(Return.state) == State.PROCESSING,
            col(Return.claimed_until) == ret.claimed_until).values(claimed_until=lease, updated_at=now))
        if changed != 1:
            return None
        session.add(Transition(return_id=_id(ret), from_state=State.PROCESSING, to_state=State.PROCESSING,
                               at=now, actor=actor.name, flow_run_id=actor.flow_run_id,
                               facts={"re_driven": True, "lease_until": lease.isoformat()}))
        _written(ret, claimed_until=lease, updated_at=now)
        return ret
    return None


def release(session: Session, rma: str, policy: Policy) -> bool:
    """End the claim on a return whose refund a provider holds pending, back to when it began: whoever hears first
    (the provider's webhook, the next sweep) asks about the refund at once, instead of after the lease."""
    ret = load_return(session, rma)
    if ret.state != State.PROCESSING or ret.claimed_until is None:
        return False
    began = ret.claimed_until - timedelta(minutes=policy.processing_lease_minutes)
    return _updated(session, update(Return).where(
        col(Return.id) == ret.id, col(Return.state) == State.PROCESSING,
        col(Return.claimed_until) == ret.claimed_until).values(claimed_until=began)) == 1


def current_settlement(session: Session, ret: Return, policy: Policy) -> pol.Settlement:
    """The settlement the stored receipt earns, counting an operator's authorize after a receipt-time review."""
    approved = session.scalars(select(col(Transition.id)).where(
        col(Transition.return_id) == ret.id, col(Transition.from_state) == State.REVIEW,
        col(Transition.to_state) == State.PROCESSING)).first() is not None
    return settlement_for(session, ret, policy, approved=approved)


def plan_refund(session: Session, ret: Return, policy: Policy) -> PlannedRefund:
    """Compute the refund and its allocation; reads only. StaleState unless the return is (still) processing: a plan
    made after another worker completed it would allocate what is left on the payments, under the same keys."""
    assert ret.rma is not None
    if ret.state != State.PROCESSING:
        raise StaleState(f"{ret.rma} is '{ret.state}', not processing")
    settlement = current_settlement(session, ret, policy)
    rows = list(session.scalars(select(Payment).where(col(Payment.order_number) == ret.order_number)))
    # What the gateway already paid under other returns' keys, recorded or not: a return parked after a partial
    # payout (its refund row never written) must still use up that payment's room, or a sibling could pay it again.
    paid_elsewhere = dict(session.execute(
        select(col(GatewaySettlement.payment_id), func.sum(GatewaySettlement.amount_cents))
        .where(col(GatewaySettlement.payment_id).in_([p.id for p in rows]),
               ~col(GatewaySettlement.idempotency_key).startswith(f"refund:{ret.rma}:"))
        .group_by(col(GatewaySettlement.payment_id))).all())
    at_providers = refunded_elsewhere(session, _id(ret), [_id(p) for p in rows])
    payments = [pol.PaymentFacts(p.id or 0, p.method, p.last4, from_cents(p.amount_cents),
                                 from_cents(max(p.refunded_cents, int(paid_elsewhere.get(p.id, 0)),
                                                at_providers.get(p.id or 0, 0))), p.captured_at)
                for p in rows]
    assert ret.id is not None
    return PlannedRefund(ret.rma, ret.id, settlement, pol.allocate_refund(settlement.refund_total, payments))


def complete(session: Session, ret: Return, plan: PlannedRefund, references: dict[int, str], now: datetime,
             actor: Actor, settings: Settings) -> Return:
    """Record the paid refund (or the replacement sent), complete the return and enqueue the email; once only."""
    if session.scalars(select(col(Refund.id)).where(col(Refund.return_id) == ret.id)).first() is not None:
        raise StaleState(f"{ret.rma} is already refunded")
    total = to_cents(plan.settlement.refund_total)
    refund = Refund(return_id=_id(ret), idempotency_key=f"refund:{plan.rma}", amount_cents=total, created_at=now)
    session.add(refund)
    session.flush()
    paid: list[dict[str, str | None]] = []
    for alloc in plan.allocations:
        cents = to_cents(alloc.amount)
        session.add(RefundAllocation(refund_id=_id(refund), payment_id=alloc.payment_id, amount_cents=cents,
                                     gateway_reference=references[alloc.payment_id]))
        changed = _updated(session, update(Payment).where(
            col(Payment.id) == alloc.payment_id, col(Payment.refunded_cents) + cents <= col(Payment.amount_cents))
            .values(refunded_cents=col(Payment.refunded_cents) + cents))
        if changed != 1:
            raise StaleState(f"payment {alloc.payment_id} has no room left for this refund")
        pay = session.get(Payment, alloc.payment_id)
        assert pay is not None
        paid.append({"method": pay.method, "last4": pay.last4, "amount": str(alloc.amount)})
    lines = {ln.sku: ln for ln in _lines(session, ret)}
    order_lines = _order_lines(session, ret.order_number)
    names = _names(session, set(lines))
    rows = []
    for st in plan.settlement.lines:
        ln = lines[st.sku]
        ln.settled_refund_cents, ln.settled_fee_cents = to_cents(st.refund), to_cents(st.restocking_fee)
        ln.replacement_units, ln.settlement_note = st.replacement_units, st.note
        ol = order_lines[ln.order_line_id]
        rows.append({"sku": st.sku, "name": names[st.sku], "quantity": ln.quantity,
                     "price": str(from_cents(ol.unit_price_cents * st.refunded_units)),
                     "tax": str(from_cents(ol.unit_tax_cents * st.refunded_units)),
                     "restocking_fee": str(st.restocking_fee), "refund": str(st.refund),
                     "replacement_units": st.replacement_units, "note": st.note})
    transition(session, ret, State.COMPLETED, now, actor,
               {"refund": str(plan.settlement.refund_total), "settlement": [s.as_dict() for s in plan.settlement.lines],
                "allocations": [{"payment_id": a.payment_id, "amount": str(a.amount)} for a in plan.allocations]},
               completed_at=now, claimed_until=None, refund_total_cents=total)
    _email(session, ret, "processed", {"lines": rows, "refund_total": str(plan.settlement.refund_total),
                                        "payments": paid, "resolution": ret.resolution}, now, settings)
    return ret


def park(session: Session, rma: str, reason: str, now: datetime, actor: Actor, settings: Settings) -> bool:
    """Processing that failed for good (the gateway refused the refund): processing -> review, and Customer Care is
    told why, so an operator settles it instead of a sweep re-driving it into the same error every hour."""
    ret = load_return(session, rma, for_update=True)
    if ret.state != State.PROCESSING:
        return False
    parked = session.scalar(select(func.count()).select_from(Transition).where(
        col(Transition.return_id) == ret.id, col(Transition.from_state) == State.PROCESSING,
        col(Transition.to_state) == State.REVIEW)) or 0
    transition(session, ret, State.REVIEW, now, actor, {"error": reason}, claimed_until=None)
    _email(session, ret, "review_needed", {"reasons": [reason]}, now, settings, to_care=True,
           occasion=f"processing-{parked + 1}")  # one email per parking, even after an earlier review
    return True


# ---- operators -------------------------------------------------------------------------------------------


def settle_review(session: Session, rma: str, authorize: bool, note: str, actor: Actor, now: datetime,
                  policy: Policy, settings: Settings) -> Return:
    """An operator settles a return in review: before receipt it is authorized (RMA issued) or declined; after
    receipt an authorize sends it to processing with the flagged units settled as sound."""
    ret = load_return(session, rma, for_update=True)
    if ret.state != State.REVIEW:
        raise InvalidInput(f"{ret.rma} is '{ret.state}', not in review")
    facts = {"note": note, "authorize": authorize}
    if not authorize:
        # Parked after a partial payout: declining would tell the customer "no refund" with money already on its
        # way to them, and free the units (R11) for another return that would refund them again.
        cents, where = paid_out(session, ret)
        if cents:
            raise InvalidInput(f"{ret.rma} has {from_cents(cents)} already refunded ({'; '.join(where[:3])}): "
                               "authorize it to finish the refund, or reverse that refund at the provider first")
        _decline(session, ret, now, actor, settings, facts, f"Declined after review: {note}")
    elif ret.received_at is None:
        for ln in _lines(session, ret):
            if ln.outcome == Outcome.REVIEW:
                ln.outcome = Outcome.AUTHORIZED
        session.flush()
        _authorize(session, ret, now, actor, policy, settings, facts)
    else:
        if _another_in_processing(session, ret):
            raise StaleState(f"another return of order {ret.order_number} is being processed; try again shortly")
        transition(session, ret, State.PROCESSING, now, actor, facts,
                   claimed_until=now + timedelta(minutes=policy.processing_lease_minutes))
    return ret


def cancel(session: Session, rma: str, note: str, actor: Actor, now: datetime) -> Return:
    """Withdraw an authorized return (customer or operator); its units become returnable again (R11)."""
    ret = load_return(session, rma, for_update=True)
    if ret.state != State.AUTHORIZED:
        raise InvalidInput(f"{ret.rma} is '{ret.state}'; only an authorized return awaiting its parcel "
                           "can be cancelled")
    transition(session, ret, State.CANCELLED, now, actor, {"note": note})
    return ret


# ---- sweep (R8, R9, stuck work) --------------------------------------------------------------------------


def _candidates(session: Session, stmt: Any, limit: int) -> list[str]:
    stmt = stmt.order_by(col(Return.id)).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return [r for r in session.scalars(stmt) if r is not None]


def sweep_candidates(session: Session, as_of: datetime, policy: Policy, limit: int = 500) -> SweepPlan:
    """RMAs that the sweep must act on at `as_of`, at most `limit` of each kind."""
    open_clock = [State.RECEIVED, State.PROCESSING, State.REVIEW]
    due_soon_from = as_of + timedelta(hours=policy.escalate_before_hours)
    stale = as_of - timedelta(minutes=policy.processing_lease_minutes)
    return SweepPlan(
        expire=_candidates(session, select(col(Return.rma)).where(col(Return.state) == State.AUTHORIZED,
                                                             col(Return.rma_expires_at) <= as_of), limit),
        due_soon=_candidates(session, select(col(Return.rma)).where(
            col(Return.state).in_(open_clock), col(Return.deadline_at) <= due_soon_from,
            col(Return.deadline_at) > as_of, col(Return.due_soon_flagged_at).is_(None)), limit),
        overdue=_candidates(session, select(col(Return.rma)).where(
            col(Return.state).in_(open_clock), col(Return.deadline_at) <= as_of,
            col(Return.overdue_flagged_at).is_(None)), limit),
        redrive=_candidates(session, select(col(Return.rma)).where(
            ((col(Return.state) == State.PROCESSING) & (col(Return.claimed_until) <= as_of))
            | ((col(Return.state) == State.RECEIVED) & (col(Return.updated_at) <= stale))), limit),
    )


def expire(session: Session, rma: str, as_of: datetime, now: datetime, actor: Actor, policy: Policy,
           settings: Settings) -> bool:
    """R8: an authorized RMA past its validity at `as_of` expires (recorded at `now`); the customer is told."""
    ret = load_return(session, rma, for_update=True)
    if ret.state != State.AUTHORIZED or ret.rma_expires_at is None or ret.rma_expires_at > as_of:
        return False
    transition(session, ret, State.EXPIRED, now, actor,
               {"valid_until": ret.rma_expires_at.isoformat(), "as_of": as_of.isoformat()})
    _email(session, ret, "expired", {"valid_until": policy.local_date(ret.rma_expires_at).isoformat()}, now, settings)
    return True


def escalate(session: Session, rma: str, flag: pol.Flag, as_of: datetime, now: datetime, policy: Policy,
             settings: Settings) -> bool:
    """R9: tell Customer Care once that a return is due soon at `as_of`, and once that it is overdue."""
    ret = load_return(session, rma, for_update=True)
    if ret.deadline_at is None or ret.state in TERMINAL:
        return False
    if pol.deadline_flag(policy, ret.deadline_at, as_of) is not flag or flag is pol.Flag.ON_TIME:
        return False
    column = Return.due_soon_flagged_at if flag is pol.Flag.DUE_SOON else Return.overdue_flagged_at
    if _updated(session, update(Return).where(col(Return.id) == ret.id, col(column).is_(None))
                .values({column: as_of})) != 1:
        return False
    assert ret.received_at is not None
    _email(session, ret, str(flag), {"received_on": policy.local_date(ret.received_at).isoformat(),
                                     "deadline": ret.deadline_at.isoformat(), "state": ret.state},
           now, settings, to_care=True)
    return True


# ---- reads -----------------------------------------------------------------------------------------------


def _subject(message: OutboxMessage, shop: Shop) -> str | None:
    """The subject the customer sees for this message; None if its context no longer renders."""
    try:
        return subject_line(message.kind, message.context, shop)
    except (TemplateError, KeyError, ValueError, TypeError, ArithmeticError):
        return None


def show(session: Session, rma_text: str, now: datetime, policy: Policy, shop: Shop | None = None) -> dict[str, Any]:
    """Everything an operator needs about one return: state, timeline, lines, money, deadline, emails (with the
    subject each one has when `shop` is given)."""
    ret = load_return(session, rma_text)
    lines = _lines(session, ret)
    timeline = session.scalars(select(Transition).where(col(Transition.return_id) == ret.id)
                               .order_by(col(Transition.id)))
    refund = session.scalars(select(Refund).where(col(Refund.return_id) == ret.id)).first()
    payments: list[dict[str, Any]] = []
    if refund is not None:
        for alloc in session.scalars(select(RefundAllocation).where(col(RefundAllocation.refund_id) == refund.id)):
            pay = session.get(Payment, alloc.payment_id)
            assert pay is not None
            payments.append({"method": pay.method, "last4": pay.last4, "amount": str(from_cents(alloc.amount_cents)),
                             "reference": alloc.gateway_reference})
    flag = None
    if ret.deadline_at is not None and ret.state not in TERMINAL:
        flag = str(pol.deadline_flag(policy, ret.deadline_at, now))
    mail = session.scalars(select(OutboxMessage).where(col(OutboxMessage.return_id) == ret.id,
                                                       col(OutboxMessage.kind) != MessageKind.WEBHOOK)
                           .order_by(col(OutboxMessage.id)))

    def iso(t: datetime | None) -> str | None:
        return t.isoformat() if t else None

    return {
        "rma_number": ret.rma, "order_number": ret.order_number, "state": ret.state, "reason": ret.reason,
        "resolution": ret.resolution, "policy_version": ret.policy_version,
        "clauses": ret.decision.get("clauses", []),
        "requested_at": iso(ret.requested_at), "rma_valid_until": iso(ret.rma_expires_at),
        "received_at": iso(ret.received_at), "deadline": iso(ret.deadline_at), "deadline_flag": flag,
        "completed_at": iso(ret.completed_at),
        "refund_total": str(from_cents(ret.refund_total_cents)),
        "lines": [{"sku": ln.sku, "quantity": ln.quantity, "decision": ln.outcome, "basis": ln.basis,
                   "clauses": ln.clauses, "reason": ln.reason_text, "refund": str(from_cents(ln.refund_cents)),
                   "restocking_fee": str(from_cents(ln.restocking_fee_cents)),
                   "received": None if ln.received_unopened is None else {
                       "unopened": ln.received_unopened, "opened": ln.received_opened,
                       "damaged": ln.received_damaged, "missing": ln.received_missing},
                   "settled_refund": None if ln.settled_refund_cents is None
                   else str(from_cents(ln.settled_refund_cents)),
                   "replacement_units": ln.replacement_units, "note": ln.settlement_note} for ln in lines],
        "payments_refunded": payments,
        "timeline": [{"at": t.at.isoformat(), "from": t.from_state, "to": t.to_state, "actor": t.actor,
                      "flow_run_id": t.flow_run_id} for t in timeline],
        "emails": [{"kind": m.kind, "status": m.status, "attempts": m.attempts, "sent_at": iso(m.sent_at),
                    "to_customer": m.kind in CUSTOMER_KINDS}
                   | ({"subject": _subject(m, shop)} if shop is not None else {}) for m in mail],
    }


def counts_by_state(session: Session) -> dict[str, int]:
    """How many returns are in each state (the sweep's board)."""
    rows = session.execute(select(col(Return.state), func.count()).group_by(col(Return.state)))
    return {str(s): int(n) for s, n in rows}
