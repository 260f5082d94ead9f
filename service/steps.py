"""The pipeline's steps, one side effect each, shared by the command line and the Prefect tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select

from adapters.config import Settings
from adapters.config import settings as load_settings
from adapters.crashpoints import crash_point
from adapters.db import engine_for, unit_of_work
from adapters.payments.gateway import Gateway, LedgerGateway
from models.errors import PermanentError, StaleState
from models.policy import DEFAULT_POLICY, Flag, Policy, deadline_flag
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn
from models.states import State
from models.tables import Customer, Order, OutboxMessage, Return
from service import returns as svc
from service.returns import Actor


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Pipeline:
    """Everything a step needs: where the data is, the policy, the gateway; built once per process."""

    settings: Settings
    engine: Engine
    policy: Policy = DEFAULT_POLICY
    gateway: Gateway = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.gateway is None:
            self.gateway = LedgerGateway(self.engine)

    @classmethod
    def from_env(cls) -> Pipeline:
        s = load_settings()
        return cls(settings=s, engine=engine_for(s.database_url))

    # ---- one transaction each --------------------------------------------------------------------------

    def import_data(self, data: ImportIn) -> dict[str, int]:
        with unit_of_work(self.engine) as session:
            return svc.import_data(session, data).as_dict()

    def quote(self, req: ReturnRequestIn, now: datetime) -> dict[str, Any]:
        with unit_of_work(self.engine) as session:
            return svc.quote(session, req, now, self.policy).as_dict()

    def request(self, req: ReturnRequestIn, now: datetime, actor: Actor) -> dict[str, Any]:
        """Store the decision (and RMA, outbox rows) in one transaction; idempotent per idempotency key."""
        with unit_of_work(self.engine) as session:
            out = svc.request_return(session, req, now, actor, self.policy, self.settings).as_dict()
        crash_point("request.after-commit")
        return out

    def lookup(self, order_number: str, idempotency_key: str) -> dict[str, Any] | None:
        """The stored outcome of the request made for this order with this idempotency key, if any."""
        with unit_of_work(self.engine) as session:
            ret = session.scalars(select(Return).where(Return.order_number == order_number,
                                                       Return.idempotency_key == idempotency_key)).first()
            return None if ret is None else svc.RequestResult(ret, ret.decision, replayed=True).as_dict()

    def outbox_counts(self) -> dict[str, int]:
        """How many outbox rows are pending, sent and failed."""
        with unit_of_work(self.engine) as session:
            rows = session.execute(select(OutboxMessage.status, func.count()).group_by(OutboxMessage.status)).all()
        return {"pending": 0, "sent": 0, "failed": 0} | {str(s): int(n) for s, n in rows}

    def render_label(self, rma: str) -> str | None:
        """Write the RMA's label PDF if it is not there yet; deterministic, so a re-run rewrites the same bytes."""
        from adapters.label.layout import LabelData, LabelLine, label_path, render_label, write_label

        path = label_path(self.settings.label_dir, rma)
        if path.exists():
            return str(path)
        with unit_of_work(self.engine) as session:
            ret = svc.load_return(session, rma)
            if ret.rma_issued_at is None or ret.rma_expires_at is None:
                return None
            order = session.get(Order, ret.order_number)
            assert order is not None
            customer = session.get(Customer, order.account)
            assert customer is not None
            ctx = svc._issue_context(session, ret, self.policy)
        address = tuple(x for x in (customer.line1, customer.line2,
                                    f"{customer.city}, {customer.region} {customer.postal_code}".replace(" ,", ","),
                                    customer.country) if x)
        data = LabelData(
            rma=rma, order_number=ret.order_number, customer_name=customer.name, address_lines=address,
            lines=tuple(LabelLine(ln["sku"], ln["name"], ln["quantity"]) for ln in ctx["lines"]),
            issued_on=self.policy.local_date(ret.rma_issued_at), valid_until=self.policy.local_date(ret.rma_expires_at),
            prepaid=bool(ctx["prepaid"]),
        )
        pdf = render_label(data, self.settings.shop, policy=self.policy)
        return str(write_label(self.settings.label_dir, rma, pdf))

    def receive(self, receipt: ReceiptIn, now: datetime, flow_run_id: str | None = None,
                claim: bool = False) -> dict[str, Any]:
        """Record the receipt; with `claim`, processing starts in the same transaction (received -> processing)."""
        with unit_of_work(self.engine) as session:
            ret = svc.receive(session, receipt, now, self.policy, self.settings, flow_run_id)
            if claim and ret.state == State.RECEIVED:
                actor = Actor(f"operator:{receipt.by}", flow_run_id)
                ret = svc.claim(session, ret.rma or receipt.rma, now, actor, self.policy) or ret
            out = {"rma_number": ret.rma, "state": ret.state, "deadline": ret.deadline_at.isoformat()
                   if ret.deadline_at else None}
        crash_point("receive.after-commit")
        return out

    def claim(self, rma: str, now: datetime, actor: Actor) -> bool:
        """received -> processing under a lease (or re-take an expired lease); False if not ours to process."""
        with unit_of_work(self.engine) as session:
            claimed = svc.claim(session, rma, now, actor, self.policy) is not None
        crash_point("process.after-claim")
        return claimed

    def plan_refund(self, rma: str) -> svc.PlannedRefund:
        with unit_of_work(self.engine) as session:
            ret = svc.load_return(session, rma, for_update=True)  # a completion cannot land between state and payments
            return svc.plan_refund(session, ret, self.policy)

    def pay(self, plan: svc.PlannedRefund) -> dict[int, str]:
        """Call the gateway per allocation with keys derived from the RMA: a retry never pays twice."""
        crash_point("process.before-pay")
        paid = {a.payment_id: self.gateway.refund(key=plan.key(a.payment_id), payment_id=a.payment_id,
                                                  amount_cents=int(a.amount * 100))
                for a in plan.allocations}
        crash_point("process.after-pay")
        return paid

    def complete(self, rma: str, plan: svc.PlannedRefund, references: dict[int, str], now: datetime,
                 actor: Actor) -> dict[str, Any]:
        with unit_of_work(self.engine) as session:
            ret = svc.load_return(session, rma, for_update=True)
            if ret.state != State.PROCESSING:
                raise StaleState(f"{ret.rma} is '{ret.state}', not processing")
            svc.complete(session, ret, plan, references, now, actor, self.settings)
            out = {"rma_number": ret.rma, "state": ret.state, "refund_total": str(plan.settlement.refund_total),
                   "payments": [{"payment_id": a.payment_id, "amount": str(a.amount)} for a in plan.allocations]}
        crash_point("process.after-commit")
        return out

    def process(self, rma: str, now: datetime, actor: Actor) -> dict[str, Any] | None:
        """claim -> plan -> pay -> complete; None if the return is not (or no longer) ours to process."""
        if not self.claim(rma, now, actor):
            return None
        return self.finish(rma, now, actor)

    def finish(self, rma: str, now: datetime, actor: Actor) -> dict[str, Any]:
        """plan -> pay -> complete for a return already claimed (by `claim` or an operator's review)."""
        plan = self.plan_refund(rma)
        references = self.pay(plan)
        return self.complete(rma, plan, references, now, actor)

    def review(self, rma: str, authorize: bool, note: str, by: str, now: datetime,
               flow_run_id: str | None = None) -> dict[str, Any]:
        with unit_of_work(self.engine) as session:
            ret = svc.settle_review(session, rma, authorize, note, by, now, self.policy, self.settings, flow_run_id)
            return {"rma_number": ret.rma, "state": ret.state}

    def cancel(self, rma: str, note: str, by: str, now: datetime, flow_run_id: str | None = None) -> dict[str, Any]:
        with unit_of_work(self.engine) as session:
            ret = svc.cancel(session, rma, note, by, now, flow_run_id)
            return {"rma_number": ret.rma, "state": ret.state}

    def show(self, rma: str, now: datetime) -> dict[str, Any]:
        with unit_of_work(self.engine) as session:
            return svc.show(session, rma, now, self.policy)

    def sweep_plan(self, as_of: datetime, limit: int = 500) -> svc.SweepPlan:
        with unit_of_work(self.engine) as session:
            return svc.sweep_candidates(session, as_of, self.policy, limit)

    def expire(self, rma: str, as_of: datetime, flow_run_id: str | None = None) -> bool:
        crash_point("sweep.mid")
        with unit_of_work(self.engine) as session:
            return svc.expire(session, rma, as_of, utcnow(), self.policy, self.settings, flow_run_id)

    def escalate(self, rma: str, flag: Flag, as_of: datetime) -> bool:
        crash_point("sweep.mid")
        with unit_of_work(self.engine) as session:
            return svc.escalate(session, rma, flag, as_of, utcnow(), self.policy, self.settings)

    def sweep(self, as_of: datetime, actor: Actor | None = None) -> dict[str, list[str]]:
        """Expire (R8), escalate (R9) and re-drive stuck processing; each return in its own short transaction."""
        actor = actor or Actor("sweep")
        plan = self.sweep_plan(as_of)
        done: dict[str, list[str]] = {"expired": [], "due_soon": [], "overdue": [], "processed": [], "labels": []}
        done["expired"] = [r for r in plan.expire if self.expire(r, as_of)]
        done["due_soon"] = [r for r in plan.due_soon if self.escalate(r, Flag.DUE_SOON, as_of)]
        done["overdue"] = [r for r in plan.overdue if self.escalate(r, Flag.OVERDUE, as_of)]
        done["processed"] = [r for r in plan.redrive if self.redrive(r, as_of, actor)]
        done["labels"] = [r for r in self.missing_labels() if self.render_label(r)]
        return done

    def redrive(self, rma: str, now: datetime, actor: Actor) -> bool:
        """Process a return the sweep found stuck. A permanent failure (the gateway refused the refund) parks it in
        review for an operator instead of aborting the sweep for every return behind it, hour after hour."""
        try:
            return self.process(rma, now, actor) is not None
        except StaleState:
            return False  # another worker got there first
        except PermanentError as exc:
            with unit_of_work(self.engine) as session:
                svc.park(session, rma, str(exc), now, actor, self.settings)
            return False

    def missing_labels(self) -> list[str]:
        """Authorized RMAs whose label file is not on disk (a crash between commit and render)."""
        from adapters.label.layout import label_path

        with unit_of_work(self.engine) as session:
            rmas = session.scalars(select(Return.rma).where(Return.state == str(State.AUTHORIZED))).all()
        return [r for r in rmas if r and not label_path(self.settings.label_dir, r).exists()]

    def relay(self, now: datetime) -> dict[str, Any]:
        """Send what the outbox holds; report without personal data."""
        from adapters.mail.transport import transport_from_settings
        from service.relay import relay

        report = relay(self.engine, transport_from_settings(self.settings), settings=self.settings, now=now)
        return {"sent": report.sent, "failed": report.failed, "deferred": report.deferred, "halted": report.halted}

    def board(self, as_of: datetime) -> dict[str, Any]:
        """Counts per state, and the RMAs due soon, overdue and stuck at `as_of`."""
        with unit_of_work(self.engine) as session:
            counts = svc.counts_by_state(session)
            plan = svc.sweep_candidates(session, as_of, self.policy)
            open_clock = session.execute(select(Return.rma, Return.deadline_at).where(
                Return.state.in_([str(State.RECEIVED), str(State.PROCESSING), str(State.REVIEW)]),  # type: ignore[attr-defined]
                Return.deadline_at.is_not(None))).all()  # type: ignore[union-attr]
        flags = {rma: deadline_flag(self.policy, deadline, as_of) for rma, deadline in open_clock}
        return {"as_of": as_of.isoformat(), "counts": counts,
                "due_soon": sorted(r for r, f in flags.items() if f is Flag.DUE_SOON),
                "overdue": sorted(r for r, f in flags.items() if f is Flag.OVERDUE),
                "stuck": plan.redrive}
