"""Paying a planned refund through the provider that captured each payment (the ledger through the gateway).

A refund asked of a provider is recorded per attempt (`ProviderRefund`): a retry asks about it instead of paying
again, a pending one is asked about until it settles, and a failed one gets a new attempt (a new key) only after
a person authorized the return again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from adapters.crashpoints import crash_point
from adapters.db import unit_of_work
from adapters.payments.base import (
    ProviderPayment,
    ProviderRefused,
    RefundResult,
    RefundStatus,
    check_amount,
)
from adapters.payments.events import ProviderEvent
from adapters.payments.gateway import Gateway
from adapters.payments.providers import LEDGER, Providers
from models.errors import InvalidInput
from models.money import from_cents, to_cents
from models.policy import Allocation
from models.rma import parse_rma
from models.states import State
from models.tables import GatewaySettlement, Payment, ProviderEventIn, ProviderRefund, Return, Transition
from service.results import Payout, PlannedRefund

GONE = (RefundStatus.FAILED, RefundStatus.CANCELED)  # the provider gave the money back: no room used


def pay(engine: Engine, gateway: Gateway, providers: Providers, plan: PlannedRefund) -> Payout:
    """Each allocation through its payment's provider; what settled, what is still pending and what failed."""
    with unit_of_work(engine) as session:
        provider_of = dict(session.execute(select(col(Payment.id), col(Payment.provider)).where(
            col(Payment.id).in_([a.payment_id for a in plan.allocations]))).all())
    paid: dict[int, str] = {}
    waiting: list[str] = []
    failures: list[str] = []
    for a in plan.allocations:
        if provider_of.get(a.payment_id, LEDGER) == LEDGER:
            paid[a.payment_id] = gateway.refund(key=plan.key(a.payment_id), payment_id=a.payment_id,
                                                amount_cents=to_cents(a.amount))
            continue
        result = _through_provider(engine, providers, plan, a)
        if result.status is RefundStatus.SUCCEEDED:
            assert result.provider_ref
            paid[a.payment_id] = result.provider_ref
        elif result.status in GONE:
            failures.append(f"the {provider_of[a.payment_id]} refund {result.provider_ref or ''} of payment "
                            f"{a.payment_id} {result.status}: {result.failure_reason or 'no reason given'}"
                            .replace("  ", " "))
        else:
            waiting.append(result.provider_ref)
    return Payout(plan, paid, waiting=tuple(waiting), failures=tuple(failures))


def refunded_elsewhere(session: Session, return_id: int | None, payment_ids: list[int | None]) -> dict[int, int]:
    """Per payment, what providers refunded or are refunding for other returns (failed and canceled ones gave the
    money back): a pending refund uses up its payment's room before its return completes."""
    rows = session.execute(
        select(col(ProviderRefund.payment_id), func.sum(ProviderRefund.amount_cents))
        .where(col(ProviderRefund.payment_id).in_(payment_ids), col(ProviderRefund.return_id) != return_id,
               col(ProviderRefund.status).not_in([str(s) for s in GONE]))
        .group_by(col(ProviderRefund.payment_id))).all()
    return {int(pid): int(cents) for pid, cents in rows}


def paid_out(session: Session, ret: Return) -> tuple[int, list[str]]:
    """What already left (or is leaving) for this return, in cents, and where: a provider's live refunds and the
    ledger's settlements under its keys. Non-zero on a return parked after a partial payout."""
    live = select(col(ProviderRefund.provider), col(ProviderRefund.provider_ref), col(ProviderRefund.amount_cents)) \
        .where(col(ProviderRefund.return_id) == ret.id, col(ProviderRefund.status).not_in([str(s) for s in GONE]))
    found = [(int(cents), f"{from_cents(int(cents))} at {provider} {ref or ''}".rstrip())
             for provider, ref, cents in session.execute(live).all()]
    found += [(int(cents), f"{from_cents(int(cents))} on the ledger ledger-{sid}") for sid, cents in session.execute(
        select(col(GatewaySettlement.id), col(GatewaySettlement.amount_cents))
        .where(col(GatewaySettlement.idempotency_key).startswith(f"refund:{ret.rma}:"))).all()]
    return sum(c for c, _ in found), [where for _, where in found]


def _through_provider(engine: Engine, providers: Providers, plan: PlannedRefund, alloc: Allocation) -> RefundResult:
    cents = to_cents(alloc.amount)
    with unit_of_work(engine) as session:
        ret = session.scalars(select(Return).where(col(Return.rma) == plan.rma)).one()
        payment = session.get(Payment, alloc.payment_id)
        assert payment is not None and ret.id is not None
        latest = session.scalars(select(ProviderRefund).where(
            col(ProviderRefund.return_id) == ret.id, col(ProviderRefund.payment_id) == payment.id)
            .order_by(col(ProviderRefund.attempt).desc()).limit(1)).first()
        reviews = session.scalar(select(func.count()).select_from(Transition).where(
            col(Transition.return_id) == ret.id, col(Transition.from_state) == State.REVIEW,
            col(Transition.to_state) == State.PROCESSING)) or 0
        target = ProviderPayment(payment.id or 0, payment.provider, payment.reference or "")
        return_id = ret.id
    adapter = providers.adapter(target.provider)
    if latest is not None:
        status = RefundStatus(latest.status)
        key = latest.idempotency_key
        if status not in GONE or latest.reviews_seen >= reviews:
            # Asked before: ask about that refund (a pending one may have settled), never pay it again. A failed one
            # stays failed until a person authorized the return again.
            if status.final or latest.provider_ref is None:
                return RefundResult(latest.provider_ref or "", status, latest.amount_cents, latest.failure_reason)
            result = check_amount(adapter.get_refund(latest.provider_ref), cents, key)
            _record(engine, latest.id, result)
            if result.status not in GONE or latest.reviews_seen >= reviews:
                return result
            # It failed while its return waited in review, and a person has authorized the return since: the next
            # attempt now, rather than a second parking for what happened before the person looked.
    attempt = 1 if latest is None else latest.attempt + 1
    key = plan.key(target.payment_id) + ("" if attempt == 1 else f":{attempt}")
    reference = f"{plan.rma}-{target.payment_id}" + ("" if attempt == 1 else f"-{attempt}")
    try:
        result = adapter.refund(target, cents, key, reference, f"Return {plan.rma}")
    except ProviderRefused as exc:
        # Recorded as a failed attempt: Stripe replays a refusal under its key, so a retry after a person looked
        # needs the next attempt's key.
        result = RefundResult("", RefundStatus.FAILED, cents, str(exc))
    crash_point("provider.after-refund")
    row = ProviderRefund(return_id=return_id, payment_id=target.payment_id, attempt=attempt, idempotency_key=key,
                         provider=target.provider, provider_ref=result.provider_ref or None, amount_cents=cents,
                         status=str(result.status), failure_reason=result.failure_reason, reviews_seen=reviews,
                         created_at=datetime.now(UTC), updated_at=datetime.now(UTC))
    try:
        with unit_of_work(engine) as session:
            session.add(row)
    except IntegrityError:
        pass  # a concurrent retry recorded the same attempt: the provider made one refund for both (same key)
    return result


def _record(engine: Engine, row_id: int | None, result: RefundResult) -> None:
    with unit_of_work(engine) as session:
        session.execute(update(ProviderRefund).where(col(ProviderRefund.id) == row_id).values(
            status=str(result.status), failure_reason=result.failure_reason, updated_at=datetime.now(UTC))
            .execution_options(synchronize_session=False))


@dataclass(frozen=True)
class Heard:
    """What a provider's event means here: a redelivery (ignored), and the return to ask about its refund now."""

    duplicate: bool
    rma: str | None = None


def heard(engine: Engine, event: ProviderEvent) -> Heard:
    """A delivery of `event`: seen before, or the processing return whose refund it names (by the provider's
    reference we recorded, else by our merchant reference, for a refund a crash left unrecorded)."""
    with unit_of_work(engine) as session:
        if session.scalar(select(col(ProviderEventIn.id)).where(
                col(ProviderEventIn.provider) == event.provider, col(ProviderEventIn.event_id) == event.event_id)):
            return Heard(duplicate=True)
        waiting = col(Return.state) == State.PROCESSING
        rma = session.scalar(select(col(Return.rma)).join(ProviderRefund, col(ProviderRefund.return_id) == Return.id)
                             .where(col(ProviderRefund.provider) == event.provider,
                                    col(ProviderRefund.provider_ref) == event.refund_ref, waiting)
                             .limit(1)) if event.refund_ref else None
        if rma is None and (ours := _rma_of(event.merchant_reference)):
            rma = session.scalar(select(col(Return.rma)).where(col(Return.rma) == ours, waiting))
        return Heard(duplicate=False, rma=rma)


def remember(engine: Engine, event: ProviderEvent, rma: str | None, now: datetime) -> bool:
    """Record the event as handled; False when a concurrent delivery of it got there first."""
    try:
        with unit_of_work(engine) as session:
            session.add(ProviderEventIn(provider=event.provider, event_id=event.event_id, type=event.type[:80],
                                        provider_ref=event.refund_ref, rma=rma, received_at=now))
    except IntegrityError:
        return False
    return True


def _rma_of(merchant_reference: str | None) -> str | None:
    """The RMA in a merchant reference we set (`RMA-7K2QMXP-<payment>[-<attempt>]`), if it is one."""
    head = "-".join((merchant_reference or "").split("-")[:2])
    try:
        return parse_rma(head) if head else None
    except InvalidInput:
        return None
