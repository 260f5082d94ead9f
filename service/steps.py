"""The pipeline's steps, one side effect (one transaction, one file, one gateway call) each, on typed values.

The stages (service/stages.py) say in which order they run; the Prefect tasks wrap each one as a task run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from adapters.config import Settings
from adapters.config import settings as load_settings
from adapters.crashpoints import crash_point
from adapters.db import engine_for, unit_of_work
from adapters.label.layout import LabelData, LabelLine, label_path, render_label, write_label
from adapters.payments.base import RefundStatus
from adapters.payments.events import ProviderEvent
from adapters.payments.gateway import Gateway, LedgerGateway
from adapters.payments.providers import Providers
from models.errors import NotFound, StaleState
from models.notices import MessageKind, OutboxStatus
from models.policy import DEFAULT_POLICY, Flag, Policy, deadline_flag
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn
from models.states import TERMINAL, State
from models.tables import (
    Customer,
    Escalation,
    Order,
    OutboxMessage,
    Product,
    ProviderRefund,
    Refund,
    RefundAllocation,
    Return,
    Transition,
)
from service import escalations, refunds, storefront
from service import returns as svc
from service.relay import RelayReport, relay
from service.results import Accepted, Board, BoardRow, Completed, Decided, Moved, Payout, PlannedRefund, SweepPlan
from service.returns import Actor

OPEN_CLOCK = (State.RECEIVED, State.PROCESSING, State.REVIEW)
EXPIRY_WARNING = timedelta(days=3)  # an authorized RMA this close to its validity is on the board's expiring list
EXPIRED_SHOWN = timedelta(days=7)  # an expired RMA (and a closed escalated return) stays on the board this long
BOARD_LIMIT = 200  # rows per list; the counts table still counts them all


@dataclass
class Pipeline:
    """Everything a step needs: where the data is, the policy, the gateway; built once per process."""

    settings: Settings
    engine: Engine
    policy: Policy = DEFAULT_POLICY
    gateway: Gateway = field(default=None)  # type: ignore[assignment]  # the ledger on `engine` unless given
    providers: Providers = field(default=None)  # type: ignore[assignment]  # from the environment unless given

    def __post_init__(self) -> None:
        if self.gateway is None:
            self.gateway = LedgerGateway(self.engine)
        if self.providers is None:
            self.providers = Providers(self.engine)  # reads credentials only when a provider's payment is refunded

    @classmethod
    def from_env(cls) -> Pipeline:
        s = load_settings()
        return cls(settings=s, engine=engine_for(s.database_url))

    # ---- requests ----------------------------------------------------------------------------------------

    def import_data(self, data: ImportIn) -> svc.ImportReport:
        with unit_of_work(self.engine) as session:
            return svc.import_data(session, data)

    def quote(self, req: ReturnRequestIn, now: datetime) -> dict[str, object]:
        """The decision a request would get, as JSON (the edge's shape); writes nothing."""
        with unit_of_work(self.engine) as session:
            return svc.quote(session, req, now, self.policy).as_dict()

    def request(self, req: ReturnRequestIn, now: datetime, actor: Actor) -> Decided:
        """Store the decision (and RMA, outbox rows) in one transaction; idempotent per idempotency key."""
        with unit_of_work(self.engine) as session:
            out = svc.request_return(session, req, now, actor, self.policy, self.settings)
        crash_point("request.after-commit")
        return out

    def lookup(self, order_number: str, idempotency_key: str) -> Decided | None:
        """The stored outcome of the request made for this order with this idempotency key, if any."""
        with unit_of_work(self.engine, read_only=True) as session:
            ret = session.scalars(select(Return).where(col(Return.order_number) == order_number,
                                                       col(Return.idempotency_key) == idempotency_key)).first()
            return None if ret is None else svc.decided(ret, replayed=True)

    def render_label(self, rma: str) -> str | None:
        """Write the RMA's label PDF if it is not there yet; deterministic, so a re-run rewrites the same bytes."""
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

    # ---- receipt and processing --------------------------------------------------------------------------

    def receive(self, receipt: ReceiptIn, now: datetime, actor: Actor, claim: bool = False) -> Moved:
        """Record the receipt; with `claim`, processing starts in the same transaction (received -> processing)."""
        with unit_of_work(self.engine) as session:
            ret = svc.receive(session, receipt, now, actor, self.policy, self.settings)
            if claim and ret.state is State.RECEIVED:
                ret = svc.claim(session, ret, now, actor, self.policy) or ret
            out = Moved.of(ret)
        crash_point("receive.after-commit")
        return out

    def claim(self, rma: str, now: datetime, actor: Actor) -> bool:
        """received -> processing under a lease (or re-take an expired lease); False if not ours to process."""
        with unit_of_work(self.engine) as session:
            claimed = svc.claim(session, svc.load_return(session, rma, for_update=True), now, actor,
                                self.policy) is not None
        crash_point("process.after-claim")
        return claimed

    def plan_refund(self, rma: str) -> PlannedRefund:
        with unit_of_work(self.engine) as session:
            ret = svc.load_return(session, rma, for_update=True)  # a completion cannot land between state and payments
            return svc.plan_refund(session, ret, self.policy)

    def pay(self, plan: PlannedRefund) -> Payout:
        """Pay each allocation through its payment's provider (the ledger through `gateway`) with keys derived from
        the RMA: a retry never pays twice; a refund a provider holds pending is asked about, not paid again."""
        crash_point("process.before-pay")
        payout = refunds.pay(self.engine, self.gateway, self.providers, plan)
        if payout.waiting:
            with unit_of_work(self.engine) as session:
                svc.release(session, plan.rma, self.policy)
        crash_point("process.after-pay")
        return payout

    def complete(self, payout: Payout, now: datetime, actor: Actor) -> Completed:
        """Record what the gateway paid and complete the return with its 'processed' email, in one transaction."""
        plan = payout.plan
        with unit_of_work(self.engine) as session:
            ret = svc.load_return(session, plan.rma, for_update=True)
            if ret.state is not State.PROCESSING:
                raise StaleState(f"{ret.rma} is '{ret.state}', not processing")
            svc.complete(session, ret, plan, dict(payout.references), now, actor, self.settings)
        crash_point("process.after-commit")
        return Completed(plan.rma, plan.settlement.refund_total, plan.allocations, return_id=plan.return_id)

    def park(self, rma: str, reason: str, now: datetime, actor: Actor) -> bool:
        """processing -> review with Customer Care told why (the gateway refused the refund for good)."""
        with unit_of_work(self.engine) as session:
            return svc.park(session, rma, reason, now, actor, self.settings)

    # ---- operators ---------------------------------------------------------------------------------------

    def review(self, rma: str, authorize: bool, note: str, actor: Actor, now: datetime) -> Moved:
        with unit_of_work(self.engine) as session:
            ret = svc.settle_review(session, rma, authorize, note, actor, now, self.policy, self.settings)
            assert ret.rma is not None
            return Moved.of(ret)

    def cancel(self, rma: str, note: str, actor: Actor, now: datetime) -> Moved:
        with unit_of_work(self.engine) as session:
            ret = svc.cancel(session, rma, note, actor, now)
            assert ret.rma is not None
            return Moved.of(ret)

    # ---- sweep (R8, R9, stuck work) ------------------------------------------------------------------------

    def sweep_plan(self, as_of: datetime, limit: int = 500) -> SweepPlan:
        with unit_of_work(self.engine) as session:
            return svc.sweep_candidates(session, as_of, self.policy, limit)

    def expire(self, rma: str, as_of: datetime, now: datetime, actor: Actor) -> bool:
        crash_point("sweep.mid")
        with unit_of_work(self.engine) as session:
            return svc.expire(session, rma, as_of, now, actor, self.policy, self.settings)

    def escalate(self, rma: str, flag: Flag, as_of: datetime, now: datetime) -> bool:
        crash_point("sweep.mid")
        with unit_of_work(self.engine) as session:
            return svc.escalate(session, rma, flag, as_of, now, self.policy, self.settings)

    def missing_labels(self) -> list[str]:
        """Authorized RMAs whose label file is not on disk (a crash between commit and render)."""
        with unit_of_work(self.engine) as session:
            rmas = session.scalars(select(col(Return.rma)).where(col(Return.state) == State.AUTHORIZED)).all()
        return [r for r in rmas if r and not label_path(self.settings.label_dir, r).exists()]

    def relay(self, now: datetime, return_id: int | None = None) -> RelayReport:
        """Send what the outbox holds (only this return's rows when given); the report has no personal data."""
        from adapters.mail.transport import transport_from_settings

        return relay(self.engine, transport_from_settings(self.settings), settings=self.settings, now=now,
                     return_id=return_id)

    # ---- the storefront API ----------------------------------------------------------------------------------

    def create_api_key(self, name: str, now: datetime) -> str:
        """A new storefront key (the database keeps its hash); the only time the key itself is seen."""
        with unit_of_work(self.engine) as session:
            return storefront.create_key(session, name, now)

    def revoke_api_key(self, name: str, now: datetime) -> None:
        with unit_of_work(self.engine) as session:
            storefront.revoke_key(session, name, now)

    def provider_event(self, event: ProviderEvent) -> refunds.Heard:
        """Whether a provider's event was handled before, and the return it re-drives (see refunds.heard)."""
        return refunds.heard(self.engine, event)

    def remember_provider_event(self, event: ProviderEvent, rma: str | None, now: datetime) -> bool:
        """Record a provider's event as handled; False when another delivery of it was recorded first."""
        return refunds.remember(self.engine, event, rma, now)

    def api_key(self, key: str) -> tuple[int, str] | None:
        """(id, hash) of the live key with this secret, else None."""
        with unit_of_work(self.engine) as session:
            found = storefront.active_key(session, key)
            return None if found is None or found.id is None else (found.id, found.key_hash)

    def accept(self, api_key_id: int | None, idempotency_key: str, req: ReturnRequestIn, now: datetime) -> Accepted:
        """Check ownership (R13) and the request (R11) and store it under its key, or find the one stored before
        (IdempotencyConflict if that was another request). Nothing is decided yet: the request flow does that."""
        digest = storefront.body_hash(req)
        for attempt in range(2):
            try:
                with unit_of_work(self.engine) as session:
                    prior = storefront.prior_request(session, api_key_id, idempotency_key, digest)
                    if prior is None:
                        svc.quote(session, req, now, self.policy)  # R13 (one answer for both refusals), R11
                        svc._lock_order(session, req.order_number)  # one writer per order on PostgreSQL
                        prior = storefront.prior_request(session, api_key_id, idempotency_key, digest)
                    if prior is not None:
                        return _accepted(prior, replayed=True)
                    return _accepted(storefront.store_request(session, api_key_id, idempotency_key, req, now), False)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def request_started(self, reference: str, flow_run_id: str) -> None:
        with unit_of_work(self.engine) as session:
            row = storefront.load_request(session, reference)
            row.flow_run_id = row.flow_run_id or flow_run_id

    def answered(self, reference: str, response: dict[str, Any]) -> dict[str, Any]:
        """Keep the first final answer to a request, so a replay says exactly the same; the one kept."""
        with unit_of_work(self.engine) as session:
            row = storefront.load_request(session, reference)
            if row.response is None:
                row.response = response
            return dict(row.response)

    def accepted(self, reference: str, api_key_id: int | None) -> Accepted:
        """A stored request, visible only to the key that made it (NotFound otherwise)."""
        with unit_of_work(self.engine) as session:
            row = storefront.load_request(session, reference)
            if row.api_key_id != api_key_id:
                raise NotFound(f"no request has reference {reference[:40]}")
            return _accepted(row, replayed=True)

    def verified_request(self, reference: str, parameters: dict[str, Any]) -> ReturnRequestIn:
        """The stored request with its owner's email (in memory only): what the request flow decides on."""
        with unit_of_work(self.engine) as session:
            return storefront.verified_request(session, reference, parameters)

    def owned_request(self, order_number: str, fields: dict[str, Any]) -> ReturnRequestIn:
        """A request for an order whose owner proved it earlier (the shopper's session), with the owner's email."""
        with unit_of_work(self.engine) as session:
            return storefront.owned_request(session, order_number, fields)

    def owner_matches(self, order_number: str, email: str) -> bool:
        """R13 for a look-up: the same statements run whether the order is unknown or the email wrong."""
        with unit_of_work(self.engine) as session:
            try:
                svc.owner_of(session, order_number, email)
            except NotFound:
                return False
            return True

    def catalog(self) -> list[tuple[str, str]]:
        """(sku, name) of every product, by name: what a shopper may pick as the correct item (P6)."""
        with unit_of_work(self.engine) as session:
            return [(p.sku, p.name) for p in session.scalars(select(Product).order_by(col(Product.name)))]

    def units_left(self, order_number: str) -> list[dict[str, Any]]:
        with unit_of_work(self.engine) as session:
            return svc.units_left(session, order_number)

    def order_returns(self, order_number: str, now: datetime) -> list[dict[str, Any]]:
        with unit_of_work(self.engine) as session:
            rmas = [r.rma for r in svc.order_returns(session, order_number) if r.rma]
            return [svc.show(session, rma, now, self.policy) for rma in rmas]

    def decided_request(self, accepted: Accepted) -> Decided | None:
        """What the request flow stored for this accepted request, once it has."""
        return self.lookup(accepted.order_number, str(accepted.parameters["idempotency_key"]))

    def add_webhook(self, url: str, now: datetime) -> dict[str, Any]:
        with unit_of_work(self.engine) as session:
            ep = storefront.add_endpoint(session, url, now)
            return {"id": ep.id, "url": ep.url, "secret": ep.secret}

    def webhooks(self) -> list[dict[str, Any]]:
        with unit_of_work(self.engine) as session:
            return storefront.endpoints(session)

    def remove_webhook(self, endpoint_id: int, now: datetime) -> None:
        with unit_of_work(self.engine) as session:
            storefront.remove_endpoint(session, endpoint_id, now)

    # ---- reads ---------------------------------------------------------------------------------------------

    def return_id(self, rma: str) -> int:
        with unit_of_work(self.engine) as session:
            ret = svc.load_return(session, rma)
            assert ret.id is not None
            return ret.id

    def show(self, rma: str, now: datetime) -> dict[str, Any]:
        """Everything an operator needs about one return, as JSON (the read model of the edges), with its emails'
        subjects and the shopper's status page (the link its emails carry)."""
        with unit_of_work(self.engine) as session:
            shown = svc.show(session, rma, now, self.policy, self.settings.shop)
        return shown | {"status_page": f"{self.settings.shop.returns_page_url}/rma/{shown['rma_number']}"}

    def outcome(self, rma: str) -> Moved | Completed:
        """Where a return stands, read back from the database (what a stage run through Prefect left)."""
        with unit_of_work(self.engine) as session:
            ret = svc.load_return(session, rma)
            assert ret.rma is not None
            if ret.state is not State.COMPLETED:
                return Moved.of(ret)
            rows = session.execute(select(col(RefundAllocation.payment_id), col(RefundAllocation.amount_cents))
                                   .join(Refund, col(Refund.id) == RefundAllocation.refund_id)
                                   .where(col(Refund.return_id) == ret.id).order_by(col(RefundAllocation.id))).all()
        from models.money import from_cents
        from models.policy import Allocation

        return Completed(ret.rma, from_cents(ret.refund_total_cents),
                         tuple(Allocation(int(pid), from_cents(int(cents))) for pid, cents in rows))

    def made_in_run(self, return_id: int, flow_run_id: str) -> bool:
        """Whether the flow run stored this return (its first audit row), rather than replayed it."""
        with unit_of_work(self.engine) as session:
            first = session.scalars(select(col(Transition.flow_run_id)).where(col(Transition.return_id) == return_id)
                                    .order_by(col(Transition.id)).limit(1)).first()
        return first == flow_run_id

    def completed_by(self, rma: str, flow_run_id: str) -> bool:
        """Whether this flow run completed the return."""
        with unit_of_work(self.engine) as session:
            ret = svc.load_return(session, rma)
            return session.scalars(select(col(Transition.id)).where(
                col(Transition.return_id) == ret.id, col(Transition.to_state) == State.COMPLETED,
                col(Transition.flow_run_id) == flow_run_id)).first() is not None

    def emails_of(self, return_id: int) -> dict[str, int]:
        """How many of this return's messages are pending, sent and failed."""
        with unit_of_work(self.engine) as session:
            rows = session.execute(select(col(OutboxMessage.status), func.count()).where(
                col(OutboxMessage.return_id) == return_id, col(OutboxMessage.kind) != MessageKind.WEBHOOK)
                .group_by(col(OutboxMessage.status))).all()
        return {str(s): 0 for s in OutboxStatus} | {str(s): int(n) for s, n in rows}

    def outbox_counts(self) -> dict[str, int]:
        """How many outbox rows are pending, sent and failed."""
        with unit_of_work(self.engine) as session:
            rows = session.execute(select(col(OutboxMessage.status), func.count())
                                   .where(col(OutboxMessage.kind) != MessageKind.WEBHOOK)
                                   .group_by(col(OutboxMessage.status))).all()
        return {str(s): 0 for s in OutboxStatus} | {str(s): int(n) for s, n in rows}

    def escalate_return(self, rma: str, cause: str, source: str | None, now: datetime) -> bool:
        """Escalate the return to Customer Care (recorded, emailed); False when it was escalated before."""
        try:
            with unit_of_work(self.engine) as session:
                escalations.escalate(session, rma, cause, source, now, self.policy, self.settings)
        except IntegrityError:  # the unique return id: another firing escalated it first
            return False
        return True

    def board(self, as_of: datetime) -> Board:
        """Counts per state, and the returns waiting for a person at `as_of` (see Board)."""
        with unit_of_work(self.engine, read_only=True) as session:
            counts = svc.counts_by_state(session)
            plan = svc.sweep_candidates(session, as_of, self.policy)
            # The sweep re-drives a return whose refund is pending too (to ask its provider), but nothing is wrong
            # with it: the board shows it apart from the stuck ones.
            awaiting: set[str] = set(session.scalars(select(col(Return.rma)).join(
                ProviderRefund, col(ProviderRefund.return_id) == Return.id).where(
                col(Return.rma).in_(plan.redrive), col(ProviderRefund.status) == str(RefundStatus.PENDING))))
            open_clock = session.execute(select(col(Return.rma), col(Return.deadline_at)).where(
                col(Return.state).in_(OPEN_CLOCK), col(Return.deadline_at).is_not(None))).all()
            in_review = _in_review(session)
            expiring = [BoardRow(r.rma, r.order_number, deadline=r.rma_expires_at) for r in session.scalars(
                select(Return).where(col(Return.state) == State.AUTHORIZED,
                                     col(Return.rma_expires_at) <= as_of + EXPIRY_WARNING)
                .order_by(col(Return.rma_expires_at)).limit(BOARD_LIMIT)) if r.rma]
            expired = [BoardRow(str(rma), order, since=at, deadline=valid) for rma, order, at, valid in session.execute(
                select(col(Return.rma), col(Return.order_number), col(Transition.at), col(Return.rma_expires_at))
                .join(Transition, col(Transition.return_id) == Return.id)
                .where(col(Transition.to_state) == State.EXPIRED, col(Transition.at) > as_of - EXPIRED_SHOWN,
                       col(Return.state) == State.EXPIRED)
                .order_by(col(Transition.at).desc()).limit(BOARD_LIMIT))]
            escalated = [BoardRow(e.rma, order, since=e.escalated_at, deadline=deadline,
                                  why=f"{e.cause} ({state})") for e, order, deadline, state in session.execute(
                select(Escalation, col(Return.order_number), col(Return.deadline_at), col(Return.state))
                .join(Return, col(Return.id) == Escalation.return_id)
                .where(col(Return.state).not_in(TERMINAL) | (col(Escalation.escalated_at) > as_of - EXPIRED_SHOWN))
                .order_by(col(Escalation.escalated_at).desc()).limit(BOARD_LIMIT))]
        flags = {rma: deadline_flag(self.policy, deadline, as_of) for rma, deadline in open_clock}
        return Board(as_of=as_of, counts=counts,
                     due_soon=sorted(r for r, f in flags.items() if f is Flag.DUE_SOON),
                     overdue=sorted(r for r, f in flags.items() if f is Flag.OVERDUE),
                     stuck=[r for r in plan.redrive if r not in awaiting], in_review=in_review,
                     expiring=expiring, expired=expired, escalated=escalated,
                     deadlines={str(rma): d for rma, d in open_clock}, awaiting_provider=sorted(awaiting))


def _in_review(session: Session) -> list[BoardRow]:
    """Returns in review: since when, the deadline if received, and why (the reasons Customer Care was sent)."""
    rows = session.execute(select(col(Return.id), col(Return.rma), col(Return.order_number), col(Return.deadline_at))
                           .where(col(Return.state) == State.REVIEW).order_by(col(Return.id)).limit(BOARD_LIMIT)).all()
    ids = [r[0] for r in rows]
    since: dict[int, datetime] = {}
    for rid, at in session.execute(select(col(Transition.return_id), func.max(Transition.at)).where(
            col(Transition.return_id).in_(ids), col(Transition.to_state) == State.REVIEW)
            .group_by(col(Transition.return_id))):
        since[int(rid)] = at
    why: dict[int, str] = {}
    for msg in session.scalars(select(OutboxMessage).where(  # the latest review email per return says why
            col(OutboxMessage.return_id).in_(ids), col(OutboxMessage.kind) == MessageKind.REVIEW_NEEDED)
            .order_by(col(OutboxMessage.id))):
        reasons = msg.context.get("reasons")
        why[int(msg.return_id or 0)] = "; ".join(str(x) for x in reasons) if isinstance(reasons, list) else ""
    return [BoardRow(str(rma or f"#{rid}"), order, since=since.get(rid), deadline=deadline, why=why.get(rid, ""))
            for rid, rma, order, deadline in rows]


def _accepted(row: Any, replayed: bool) -> Accepted:
    return Accepted(reference=row.reference, order_number=row.order_number,
                    parameters=dict(row.request) | {"request_ref": row.reference}, flow_run_id=row.flow_run_id,
                    response=row.response, replayed=replayed)
