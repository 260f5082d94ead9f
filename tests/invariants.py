"""The pipeline's invariants, stated once and checked after every crash, race, property and fault suite."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from email import message_from_bytes
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session

from adapters.db import unit_of_work
from models.states import TERMINAL, State
from models.tables import (
    GatewaySettlement,
    OutboxMessage,
    Payment,
    ProviderRefund,
    Refund,
    RefundAllocation,
    Return,
    Transition,
)
from service.outbox import message_id_for
from service.returns import current_settlement
from service.steps import Pipeline

GONE = ("failed", "canceled")  # a provider gave the money back: nothing paid, no room used
LIVE_STATES = (State.PROCESSING, State.REVIEW, State.COMPLETED)  # where money may have moved for a return


@dataclass(frozen=True)
class SeenAtProvider:
    """One refund as the provider's own record shows it (not ours: what it would tell an auditor)."""

    provider: str
    provider_ref: str
    payment_reference: str
    merchant_reference: str | None
    amount_cents: int
    status: str


def seen_at_stripe(rows: Iterable[dict[str, object]]) -> list[SeenAtProvider]:
    """Stripe refund objects (localstripe's, or the fake's) as the provider's record."""
    out = []
    for r in rows:
        metadata = r.get("metadata") or {}
        assert isinstance(metadata, dict)
        out.append(SeenAtProvider("stripe", str(r["id"]), str(r.get("payment_intent") or r.get("charge")),
                                  metadata.get("merchant_reference"), int(str(r["amount"])), str(r["status"])))
    return out


# The email each state requires once a return has entered it (docs/architecture.md: every transition's promise).
EMAIL_FOR_STATE = {
    State.AUTHORIZED: "rma_issued",
    State.DECLINED: "declined",
    State.REVIEW: "review_needed",
    State.RECEIVED: "received",
    State.COMPLETED: "processed",
    State.EXPIRED: "expired",
}


def check_invariants(p: Pipeline, *, settled: bool = False, mail_dir: Path | None = None,
                     at_provider: Sequence[SeenAtProvider] | None = None) -> int:
    """Assert every invariant (with `at_provider`, against a provider's own record too); `settled` adds the ones
    that hold once all work is driven to rest. Returns how many checks were made."""
    checks = 0
    with unit_of_work(p.engine) as s:
        returns = list(s.scalars(select(Return)))
        # One RMA per return, RMA numbers unique; one return per (order, idempotency key).
        rmas = [r.rma for r in returns if r.rma]
        assert len(rmas) == len(set(rmas)), "duplicate RMA numbers"
        keys = Counter((r.order_number, r.idempotency_key) for r in returns if r.idempotency_key)
        assert all(n == 1 for n in keys.values()), f"two returns for one idempotency key: {keys.most_common(1)}"
        checks += 2

        # Every state change has its audit row: the log replays to the current state.
        log: dict[int, list[Transition]] = defaultdict(list)
        for t in s.scalars(select(Transition).order_by(Transition.id)):
            log[t.return_id].append(t)
        for r in returns:
            chain = log[r.id or 0]
            assert chain and chain[0].from_state is None and chain[0].to_state == State.REQUESTED, r.id
            for a, b in zip(chain, chain[1:], strict=False):
                assert b.from_state == a.to_state, f"return {r.id}: audit log breaks at {a.to_state} -> {b.from_state}"
            assert chain[-1].to_state == r.state, f"return {r.id}: log ends {chain[-1].to_state}, row says {r.state}"
            checks += 1

        # At most one refund per return; refunds only for completed returns; allocations match payments.
        refunds = list(s.scalars(select(Refund)))
        assert len({f.return_id for f in refunds}) == len(refunds), "two refunds for one return"
        by_id = {r.id: r for r in returns}
        for f in refunds:
            assert by_id[f.return_id].state == State.COMPLETED, f"refund for a return in {by_id[f.return_id].state}"
        allocated: dict[int, int] = defaultdict(int)
        for a in s.scalars(select(RefundAllocation)):
            allocated[a.payment_id] += a.amount_cents
        for pay in s.scalars(select(Payment)):
            assert pay.refunded_cents == allocated.get(pay.id or 0, 0), f"payment {pay.id}: refunded != allocations"
            assert 0 <= pay.refunded_cents <= pay.amount_cents, f"payment {pay.id} refunded beyond capture"
            checks += 1
        # The gateway never paid more than was recorded; when settled, exactly what was recorded.
        settled_by_payment: dict[int, int] = defaultdict(int)
        for g in s.scalars(select(GatewaySettlement)):
            settled_by_payment[g.payment_id] += g.amount_cents
        gateway_keys = Counter(s.scalars(select(GatewaySettlement.idempotency_key)))
        assert all(n == 1 for n in gateway_keys.values()), "gateway paid one key twice"
        state_of = {r.rma: r.state for r in returns}
        for key in gateway_keys:  # refund:<RMA>:<payment>: paid only while a return may still complete, or completed
            assert state_of.get(key.split(":")[1]) in LIVE_STATES, f"{key} paid for a {state_of.get(key.split(':')[1])}"
            checks += 1
        for payment_id, cents in settled_by_payment.items():
            if settled:
                assert cents == allocated.get(payment_id, 0), f"payment {payment_id}: gateway {cents} != recorded"
            pay = s.get(Payment, payment_id)
            assert pay is not None and cents <= pay.amount_cents, f"gateway paid beyond capture on {payment_id}"
            checks += 1
        checks += _provider_checks(s, returns, log, settled, at_provider)
        # The refund equals what the policy computes from stored facts.
        for f in refunds:
            ret = by_id[f.return_id]
            assert f.amount_cents == int(plan_refund_total(s, ret, p) * 100), f"{ret.rma}: refund differs from policy"
            checks += 1

        # Every email a state requires exists, once; Message-IDs are derived from the row's key.
        outbox = list(s.scalars(select(OutboxMessage)))
        kinds: dict[int, set[str]] = defaultdict(set)
        for m in outbox:
            kinds[m.return_id or 0].add(m.kind)
            assert m.message_id == message_id_for(m.key, p.settings.shop.message_id_domain)
            if settled:
                assert m.status == "sent", f"outbox {m.key} is {m.status}"
            checks += 1
        for r in returns:
            entered = {State(t.to_state) for t in log[r.id or 0]}
            for state, kind in EMAIL_FOR_STATE.items():
                if state in entered:
                    assert kind in kinds[r.id or 0], f"{r.rma or r.id}: entered {state} but no {kind} email"
                    checks += 1
        if settled:
            for r in returns:
                assert State(r.state) in TERMINAL or r.state in (State.AUTHORIZED, State.REVIEW), \
                    f"{r.rma} left in {r.state} with no one to move it"
                checks += 1
        n_outbox = s.scalar(select(func.count()).select_from(OutboxMessage))
    # Nothing was sent that no committed row asked for.
    if mail_dir is not None and mail_dir.exists():
        ids = {m.message_id for m in outbox}
        for eml in mail_dir.glob("*.eml"):
            msg = message_from_bytes(eml.read_bytes())
            assert msg["Message-ID"] in ids, f"{eml.name} has no outbox row"
            checks += 1
        assert len(list(mail_dir.glob("*.eml"))) <= (n_outbox or 0)
    return checks


def _provider_checks(s: Session, returns: list[Return], log: dict[int, list[Transition]], settled: bool,
                     at_provider: Sequence[SeenAtProvider] | None) -> int:
    """Money at the providers: never two live refunds for one (return, payment), never more than a capture, a
    pending refund only on a return still being worked on, a completed return paid by the refunds it records."""
    checks = 0
    by_id = {r.id: r for r in returns}
    attempts = list(s.scalars(select(ProviderRefund).order_by(ProviderRefund.id)))
    payments = {pay.id: pay for pay in s.scalars(select(Payment))}
    live_per_payment: dict[int, int] = defaultdict(int)
    live_per_pair = Counter[tuple[int, int]]()
    latest: dict[tuple[int, int], ProviderRefund] = {}
    for a in attempts:
        latest[(a.return_id, a.payment_id)] = a  # ids grow with attempts
        if a.status in GONE:
            continue
        live_per_payment[a.payment_id] += a.amount_cents
        live_per_pair[(a.return_id, a.payment_id)] += 1
        ret = by_id[a.return_id]
        assert ret.state in LIVE_STATES, f"{ret.rma} is {ret.state} but its {a.status} refund {a.provider_ref} stands"
        if a.status not in ("succeeded",):  # pending, requires_action: asked about until it settles
            assert a.provider_ref, f"{ret.rma}: a {a.status} refund without the provider's reference"
            assert ret.state in (State.PROCESSING, State.REVIEW), f"{ret.rma}: {a.status} refund on a {ret.state}"
        checks += 1
    assert all(n == 1 for n in live_per_pair.values()), f"two live refunds for one payment: {live_per_pair}"
    for payment_id, cents in live_per_payment.items():
        assert cents <= payments[payment_id].amount_cents, f"payment {payment_id}: providers hold {cents} in refunds"
        checks += 1
    for (return_id, _), a in latest.items():
        ret = by_id[return_id]
        if settled and a.status in GONE and a.reviews_seen >= _reviews(log[return_id]):
            # failed or canceled and no person has authorized it since: it waits, visibly, in review
            assert ret.state in (State.REVIEW, State.DECLINED), f"{ret.rma}: refund {a.status}, return {ret.state}"
            checks += 1
    allocations = s.execute(select(Refund.return_id, RefundAllocation.payment_id, RefundAllocation.amount_cents,
                                   RefundAllocation.gateway_reference)
                            .join(Refund, Refund.id == RefundAllocation.refund_id)).all()  # type: ignore[arg-type]
    for return_id, payment_id, cents, reference in allocations:
        if payments[payment_id].provider in (None, "ledger"):
            continue
        a = latest.get((return_id, payment_id))
        assert a is not None and a.status == "succeeded" and a.amount_cents == cents \
            and a.provider_ref == reference, f"return {return_id}: payment {payment_id} not paid as recorded"
        checks += 1
    if at_provider is not None:
        waiting = {r.id for r in returns if r.state == State.REVIEW}
        checks += _against_provider(attempts, payments, allocations, settled, at_provider, waiting)
    return checks


def _reviews(chain: list[Transition]) -> int:
    return sum(1 for t in chain if t.from_state == State.REVIEW and t.to_state == State.PROCESSING)


def _against_provider(attempts: list[ProviderRefund], payments: dict[int | None, Payment],
                      allocations: Sequence[Any], settled: bool, record: Sequence[SeenAtProvider],
                      waiting: set[int | None]) -> int:
    """Our attempts against the provider's own record of them (`waiting`: returns in review, whose pending refunds
    nobody asks about until a person acts)."""
    checks = 0
    per_reference = Counter(r.merchant_reference for r in record if r.merchant_reference)
    assert all(n == 1 for n in per_reference.values()), f"the provider paid a reference twice: {per_reference}"
    captured = {pay.reference: pay for pay in payments.values() if pay.reference}
    live: dict[str, int] = defaultdict(int)
    for r in record:
        if r.status not in GONE:
            live[r.payment_reference] += r.amount_cents
    for reference, cents in live.items():
        pay = captured.get(reference)
        assert pay is not None and cents <= pay.amount_cents, f"{reference}: the provider refunded {cents}"
        checks += 1
    theirs = {r.provider_ref: r for r in record}
    for a in attempts:
        if a.provider_ref is None:
            continue
        seen = theirs.get(a.provider_ref)
        assert seen is not None and seen.amount_cents == a.amount_cents, f"{a.provider_ref}: not at the provider"
        if settled and a.return_id not in waiting:
            assert seen.status == a.status, f"{a.provider_ref}: ours {a.status}, theirs {seen.status}"
        checks += 1
    if settled:  # every refund the provider made for us is in our books, and the books hold no more than it paid
        ours = {a.provider_ref for a in attempts}
        assert all(r.provider_ref in ours for r in record if r.merchant_reference), "a provider refund not recorded"
        providers = {r.provider for r in record}
        recorded: dict[str, int] = defaultdict(int)
        for _, payment_id, cents, _ in allocations:
            pay = payments[payment_id]
            if pay.provider in providers:
                recorded[str(pay.reference)] += cents
        for a in attempts:  # paid on a return parked in review (another payment failed): out, waiting for a person,
            # and nobody asks about its pending refunds until that person acts: Stripe's word counts there
            seen = theirs.get(a.provider_ref or "")
            if a.return_id in waiting and seen is not None and seen.status not in GONE and a.provider in providers:
                recorded[str(payments[a.payment_id].reference)] += a.amount_cents
        for reference in set(live) | set(recorded):
            assert live.get(reference, 0) == recorded.get(reference, 0), \
                f"{reference}: provider refunded {live.get(reference, 0)}, books say {recorded.get(reference, 0)}"
            checks += 1
    return checks


def plan_refund_total(session: Session, ret: Return, p: Pipeline) -> Decimal:
    """What the policy says this completed return earns, recomputed from stored facts."""
    return current_settlement(session, ret, p.policy).refund_total
