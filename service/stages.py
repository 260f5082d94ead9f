"""What happens after each event (a request, a receipt, a review, a cancel, a sweep): the stage order, written once.

The flows run these with Prefect tasks as the steps (each step a task run with its retries); the command line, the
demo and the benchmark's floor run them with `LocalSteps`, the same steps called directly. Either way the order of
the side effects, and so what the customer and the operators end up seeing, is this module's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from adapters.clock import utcnow
from models.errors import PermanentError, StaleState
from models.policy import Flag
from models.schemas import ReceiptIn, ReturnRequestIn
from models.states import State
from service.results import Completed, Decided, Moved, Payout, SweepPlan, SweepReport
from service.returns import Actor
from service.steps import Pipeline

API = Actor("api")
SWEEP = Actor("sweep")


class Steps(Protocol):
    """The side effects stages are made of; one transaction, file or gateway call each."""

    def store_decision(self, request: ReturnRequestIn, actor: Actor) -> Decided: ...
    def render_label(self, rma: str) -> str | None: ...
    def record_receipt(self, receipt: ReceiptIn, actor: Actor) -> Moved: ...
    def claim(self, rma: str, actor: Actor) -> bool: ...
    def pay_refund(self, rma: str) -> Payout: ...
    def complete(self, payout: Payout, actor: Actor) -> Completed: ...
    def park(self, rma: str, reason: str, actor: Actor) -> bool: ...
    def settle_review(self, rma: str, authorize: bool, note: str, actor: Actor) -> Moved: ...
    def cancel(self, rma: str, note: str, actor: Actor) -> Moved: ...
    def notify(self, rma: str | None, return_id: int | None = None) -> None: ...
    def plan_sweep(self, as_of: datetime) -> SweepPlan: ...
    def expire(self, rmas: list[str], as_of: datetime) -> list[str]: ...
    def escalate(self, due_soon: list[str], overdue: list[str], as_of: datetime) -> tuple[list[str], list[str]]: ...
    def render_missing_labels(self) -> list[str]: ...
    def report_sweep(self, report: SweepReport) -> None: ...


def after_request(steps: Steps, request: ReturnRequestIn, actor: Actor = API) -> Decided:
    """request -> eligibility (P1-P6, R14) -> RMA number + label PDF -> 'RMA issued' (or 'declined') email."""
    decided = steps.store_decision(request, actor)
    if decided.rma_number and decided.authorized:
        steps.render_label(decided.rma_number)
    steps.notify(decided.rma_number, decided.return_id)
    return decided


def _refund(steps: Steps, rma: str, actor: Actor) -> Completed | Moved:
    """pay the refund -> complete with the 'processed' email (the return is claimed); the plan is made once. A
    refund a provider holds pending leaves the return processing (the sweep asks again); a failed one parks it."""
    payout = steps.pay_refund(rma)
    if payout.failures:
        steps.park(rma, "; ".join(payout.failures), actor)
        return Moved(rma, State.REVIEW)
    if payout.waiting:
        return Moved(rma, State.PROCESSING)
    return steps.complete(payout, actor)


def after_receipt(steps: Steps, receipt: ReceiptIn) -> Moved | Completed:
    """receipt at Lantana (R12) -> 10-day clock (P8) -> processing at once -> refund -> emails."""
    actor = Actor.operator(receipt.by)
    moved = steps.record_receipt(receipt, actor)
    out: Moved | Completed = moved
    if moved.state is State.PROCESSING:
        out = _refund(steps, moved.rma_number, actor)
    steps.notify(moved.rma_number, moved.return_id)
    return out


def process(steps: Steps, rma: str, actor: Actor) -> Completed | Moved | None:
    """Refund (or ship the replacement / exchange) a received return, then the 'processed' email; None if it is
    not (or no longer) waiting to be processed."""
    out = _refund(steps, rma, actor) if steps.claim(rma, actor) else None
    steps.notify(rma, out.return_id if out else None)
    return out


def after_review(steps: Steps, rma: str, authorize: bool, note: str, actor: Actor) -> Moved | Completed:
    """An operator's decision: before receipt the RMA is issued with its label (or declined); after it, paid."""
    moved = steps.settle_review(rma, authorize, note, actor)
    out: Moved | Completed = moved
    if moved.state is State.AUTHORIZED:
        steps.render_label(rma)
    elif moved.state is State.PROCESSING:
        out = _refund(steps, rma, actor)
    steps.notify(rma, moved.return_id)
    return out


def after_cancel(steps: Steps, rma: str, note: str, actor: Actor) -> Moved:
    """Withdraw an authorized return; its units become returnable again (R11)."""
    moved = steps.cancel(rma, note, actor)
    steps.notify(rma, moved.return_id)
    return moved


def redrive(steps: Steps, rma: str) -> bool:
    """Process a return the sweep found stuck. A permanent failure (the gateway refused the refund) parks it in
    review for an operator instead of failing the sweep for every return behind it, hour after hour."""
    try:
        return isinstance(process(steps, rma, SWEEP), Completed)  # not a refund still pending
    except StaleState:
        return False  # another worker got there first
    except PermanentError as exc:
        steps.park(rma, str(exc), SWEEP)
        steps.notify(rma)
        return False


def sweep(steps: Steps, as_of: datetime) -> SweepReport:
    """Expire lapsed RMAs (R8), escalate due-soon and overdue returns (R9), re-drive stuck ones, re-render labels a
    crash left missing; then the emails and what operators see. Each return in its own short transaction."""
    plan = steps.plan_sweep(as_of)
    expired = steps.expire(plan.expire, as_of)
    due_soon, overdue = steps.escalate(plan.due_soon, plan.overdue, as_of)
    processed = [rma for rma in plan.redrive if redrive(steps, rma)]
    labels = steps.render_missing_labels()
    report = SweepReport(as_of=as_of, expired=expired, due_soon=due_soon, overdue=overdue, processed=processed,
                         labels=labels)
    steps.report_sweep(report)
    return report


@dataclass
class LocalSteps:
    """The steps called directly on a pipeline, with no Prefect: the command line's, the demo's and the floor's."""

    pipeline: Pipeline
    clock: Callable[[], datetime] = utcnow

    def store_decision(self, request: ReturnRequestIn, actor: Actor) -> Decided:
        return self.pipeline.request(request, self.clock(), actor)

    def render_label(self, rma: str) -> str | None:
        return self.pipeline.render_label(rma)

    def record_receipt(self, receipt: ReceiptIn, actor: Actor) -> Moved:
        return self.pipeline.receive(receipt, self.clock(), actor, claim=True)

    def claim(self, rma: str, actor: Actor) -> bool:
        return self.pipeline.claim(rma, self.clock(), actor)

    def pay_refund(self, rma: str) -> Payout:
        return self.pipeline.pay(self.pipeline.plan_refund(rma))

    def complete(self, payout: Payout, actor: Actor) -> Completed:
        return self.pipeline.complete(payout, self.clock(), actor)

    def park(self, rma: str, reason: str, actor: Actor) -> bool:
        return self.pipeline.park(rma, reason, self.clock(), actor)

    def settle_review(self, rma: str, authorize: bool, note: str, actor: Actor) -> Moved:
        return self.pipeline.review(rma, authorize, note, actor, self.clock())

    def cancel(self, rma: str, note: str, actor: Actor) -> Moved:
        return self.pipeline.cancel(rma, note, actor, self.clock())

    def notify(self, rma: str | None, return_id: int | None = None) -> None:
        if rma or return_id:
            rid = return_id if return_id is not None else self.pipeline.return_id(str(rma))
            self.pipeline.relay(self.clock(), return_id=rid)

    def plan_sweep(self, as_of: datetime) -> SweepPlan:
        return self.pipeline.sweep_plan(as_of)

    def expire(self, rmas: list[str], as_of: datetime) -> list[str]:
        return [r for r in rmas if self.pipeline.expire(r, as_of, self.clock(), SWEEP)]

    def escalate(self, due_soon: list[str], overdue: list[str], as_of: datetime) -> tuple[list[str], list[str]]:
        return ([r for r in due_soon if self.pipeline.escalate(r, Flag.DUE_SOON, as_of, self.clock())],
                [r for r in overdue if self.pipeline.escalate(r, Flag.OVERDUE, as_of, self.clock())])

    def render_missing_labels(self) -> list[str]:
        return [r for r in self.pipeline.missing_labels() if self.pipeline.render_label(r)]

    def report_sweep(self, report: SweepReport) -> None:
        self.pipeline.relay(self.clock())
