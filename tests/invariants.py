"""The pipeline's invariants, stated once and checked after every crash, race, property and fault suite."""

from __future__ import annotations

from collections import Counter, defaultdict
from decimal import Decimal
from email import message_from_bytes
from pathlib import Path

from sqlalchemy import func, select
from sqlmodel import Session

from adapters.db import unit_of_work
from models.states import TERMINAL, State
from models.tables import (
    GatewaySettlement,
    OutboxMessage,
    Payment,
    Refund,
    RefundAllocation,
    Return,
    Transition,
)
from service.outbox import message_id_for
from service.returns import current_settlement
from service.steps import Pipeline

# The email each state requires once a return has entered it (docs/architecture.md: every transition's promise).
EMAIL_FOR_STATE = {
    State.AUTHORIZED: "rma_issued",
    State.DECLINED: "declined",
    State.REVIEW: "review_needed",
    State.RECEIVED: "received",
    State.COMPLETED: "processed",
    State.EXPIRED: "expired",
}


def check_invariants(p: Pipeline, *, settled: bool = False, mail_dir: Path | None = None) -> int:
    """Assert every invariant; `settled` adds the ones that hold once all work is driven to rest
    (no in-flight gateway payment, every email delivered). Returns how many checks were made."""
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
        for payment_id, cents in settled_by_payment.items():
            if settled:
                assert cents == allocated.get(payment_id, 0), f"payment {payment_id}: gateway {cents} != recorded"
            pay = s.get(Payment, payment_id)
            assert pay is not None and cents <= pay.amount_cents, f"gateway paid beyond capture on {payment_id}"
            checks += 1
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


def plan_refund_total(session: Session, ret: Return, p: Pipeline) -> Decimal:
    """What the policy says this completed return earns, recomputed from stored facts."""
    return current_settlement(session, ret, p.policy).refund_total
