"""Prefect tasks: one side effect each, thin over service.steps, retried only on transient errors.

`TASKS` is the stages' `Steps` made of these tasks, so every step of a stage flow is a task run of its own.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task, exponential_backoff

from adapters.clock import utcnow
from models.errors import TransientError
from models.policy import Flag
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn
from service.relay import RelayReport
from service.results import Completed, Decided, Moved, Payout, SweepPlan, SweepReport
from service.returns import Actor, ImportReport
from service.steps import Pipeline
from tasks.visibility import publish_board, publish_return

SWEEP_REPORT = "sweep-report"  # the table artifact a sweep run leaves (`returns sweep` reads it back)
RELAY_REPORT = "relay-report"


@lru_cache(maxsize=1)
def pipeline() -> Pipeline:
    """One pipeline (engine, settings, gateway) per process, built on first use."""
    return Pipeline.from_env()


def run_id() -> str | None:
    """The current Prefect flow run's id, for the audit rows this run writes."""
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def transient_only(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a failed task only when its error is transient (database busy, SMTP down, gateway timeout)."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:  # noqa: BLE001 - anything else is permanent: bad input, not eligible, declined card
        return False
    return False


# Shared by every task that talks to the database, a file system, SMTP or the gateway.
RETRY: dict[str, Any] = {
    "retries": 4,
    "retry_delay_seconds": exponential_backoff(backoff_factor=0.5),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": transient_only,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


@task(name="store-decision", timeout_seconds=30, **RETRY)
def store_decision(request: ReturnRequestIn, actor: Actor) -> Decided:
    """Decide the request and store it with its RMA and outbox rows; idempotent per idempotency key (the flow run's
    id when the caller sent none, so a retry after a lost commit reply replays instead of asking again: R11)."""
    rid = run_id()
    if request.idempotency_key is None and rid:
        request = request.model_copy(update={"idempotency_key": f"flow-run-{rid}"})
    return pipeline().request(request, utcnow(), actor.in_run(rid))


@task(name="render-label", timeout_seconds=30, **RETRY)
def render_label(rma: str) -> str | None:
    """Write the label PDF under RETURNS_HOME/labels; deterministic, skipped when present."""
    return pipeline().render_label(rma)


@task(name="record-receipt", timeout_seconds=30, **RETRY)
def record_receipt(receipt: ReceiptIn, actor: Actor) -> Moved:
    """Log the parcel with per-unit condition, start the 10-day clock (P8) and claim it for processing, in one
    transaction; a retry of the same receipt replays."""
    return pipeline().receive(receipt, utcnow(), actor.in_run(run_id()), claim=True)


@task(name="claim-return", timeout_seconds=30, **RETRY)
def claim_return(rma: str, actor: Actor) -> bool:
    """received -> processing under a lease; False when another worker holds it or it is done."""
    return pipeline().claim(rma, utcnow(), actor.in_run(run_id()))


@task(name="pay-refund", timeout_seconds=60, **RETRY)
def pay_refund(rma: str) -> Payout:
    """Plan the refund and pay it through the gateway with keys refund:<RMA>:<payment>; a retry never pays twice."""
    p = pipeline()
    return p.pay(p.plan_refund(rma))


@task(name="complete-return", timeout_seconds=30, **RETRY)
def complete_return(payout: Payout, actor: Actor) -> Completed:
    """Record the refund and complete the return with its 'processed' email, in one transaction."""
    return pipeline().complete(payout, utcnow(), actor.in_run(run_id()))


@task(name="park-return", timeout_seconds=30, **RETRY)
def park_return(rma: str, reason: str, actor: Actor) -> bool:
    """processing -> review, Customer Care told why: the gateway refused the refund for good."""
    return pipeline().park(rma, reason, utcnow(), actor.in_run(run_id()))


@task(name="settle-review", timeout_seconds=30, **RETRY)
def settle_review(rma: str, authorize: bool, note: str, actor: Actor) -> Moved:
    """An operator's decision on a return in review."""
    return pipeline().review(rma, authorize, note, actor.in_run(run_id()), utcnow())


@task(name="cancel-return", timeout_seconds=30, **RETRY)
def cancel_return(rma: str, note: str, actor: Actor) -> Moved:
    """Withdraw an authorized return."""
    return pipeline().cancel(rma, note, actor.in_run(run_id()), utcnow())


@task(name="send-outbox", timeout_seconds=120, **RETRY)
def send_outbox() -> RelayReport:
    """Deliver pending emails (at least once, stable Message-IDs); failures stay visible in the outbox."""
    return pipeline().relay(utcnow())


@task(name="import-catalog", timeout_seconds=120, **RETRY)
def import_catalog(data: ImportIn) -> ImportReport:
    """Upsert products, customers and orders."""
    return pipeline().import_data(data)


@task(name="plan-sweep", timeout_seconds=60, **RETRY)
def plan_sweep(as_of: datetime) -> SweepPlan:
    """The RMAs the sweep must act on at `as_of`."""
    return pipeline().sweep_plan(as_of)


@task(name="expire-rmas", timeout_seconds=300, **RETRY)
def expire_rmas(rmas: list[str], as_of: datetime) -> list[str]:
    """R8: expire each lapsed RMA in its own short transaction (a retry skips the done ones)."""
    actor = Actor("sweep", run_id())
    return [r for r in rmas if pipeline().expire(r, as_of, utcnow(), actor)]


@task(name="escalate-deadlines", timeout_seconds=300, **RETRY)
def escalate_deadlines(due_soon: list[str], overdue: list[str], as_of: datetime) -> tuple[list[str], list[str]]:
    """R9: tell Customer Care once per return that it is due soon, and once that it is overdue."""
    p = pipeline()
    return ([r for r in due_soon if p.escalate(r, Flag.DUE_SOON, as_of, utcnow())],
            [r for r in overdue if p.escalate(r, Flag.OVERDUE, as_of, utcnow())])


@task(name="render-missing-labels", timeout_seconds=300, **RETRY)
def render_missing_labels() -> list[str]:
    """Labels for authorized RMAs whose PDF is missing (a crash between commit and render)."""
    p = pipeline()
    return [r for r in p.missing_labels() if p.render_label(r)]


@task(name="publish-board", timeout_seconds=30, cache_policy=NO_CACHE, persist_result=False)
def publish_sweep(report: SweepReport) -> None:
    """The operators' board artifact (counts per state, due soon, overdue, stuck) and this run's report table."""
    p = pipeline()
    for rma in sorted({r for action in SweepReport.ACTIONS for r in getattr(report, action)}):
        publish_return(p, rma, run_id())
    publish_board(p.board(report.as_of), p.policy)
    create_table_artifact(key=SWEEP_REPORT, table=report.rows() or [{"action": "none", "rma": ""}],
                          description=f"What the sweep as of {report.as_of.isoformat()} did")


@task(name="notify", timeout_seconds=120, **RETRY)
def notify(rma: str | None, return_id: int | None = None) -> None:
    """The stage's emails (this return's outbox rows, at least once) and what operators see (the return's
    artifact, its events). One task run for both: each costs the Prefect server ~25-30 ms of CPU."""
    p = pipeline()
    if rma or return_id:
        p.relay(utcnow(), return_id=return_id if return_id is not None else p.return_id(str(rma)))
    if rma:
        publish_return(p, rma, run_id())


class TaskSteps:
    """The stages' steps as Prefect tasks: each call is a task run with its own retries and state."""

    def store_decision(self, request: ReturnRequestIn, actor: Actor) -> Decided:
        return store_decision(request, actor)

    def render_label(self, rma: str) -> str | None:
        return render_label(rma)

    def record_receipt(self, receipt: ReceiptIn, actor: Actor) -> Moved:
        return record_receipt(receipt, actor)

    def claim(self, rma: str, actor: Actor) -> bool:
        return claim_return(rma, actor)

    def pay_refund(self, rma: str) -> Payout:
        return pay_refund(rma)

    def complete(self, payout: Payout, actor: Actor) -> Completed:
        return complete_return(payout, actor)

    def park(self, rma: str, reason: str, actor: Actor) -> bool:
        return park_return(rma, reason, actor)

    def settle_review(self, rma: str, authorize: bool, note: str, actor: Actor) -> Moved:
        return settle_review(rma, authorize, note, actor)

    def cancel(self, rma: str, note: str, actor: Actor) -> Moved:
        return cancel_return(rma, note, actor)

    def notify(self, rma: str | None, return_id: int | None = None) -> None:
        notify(rma, return_id)

    def plan_sweep(self, as_of: datetime) -> SweepPlan:
        return plan_sweep(as_of)

    def expire(self, rmas: list[str], as_of: datetime) -> list[str]:
        return expire_rmas(rmas, as_of)

    def escalate(self, due_soon: list[str], overdue: list[str], as_of: datetime) -> tuple[list[str], list[str]]:
        return escalate_deadlines(due_soon, overdue, as_of)

    def render_missing_labels(self) -> list[str]:
        return render_missing_labels()

    def report_sweep(self, report: SweepReport) -> None:
        send_outbox()
        publish_sweep(report)


TASKS = TaskSteps()
