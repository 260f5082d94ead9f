"""Prefect tasks: one side effect each, thin over service.steps, retried only on transient errors."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task, exponential_backoff

from models.errors import TransientError
from models.policy import Flag
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn
from service.returns import Actor
from service.steps import Pipeline
from tasks.visibility import publish_return


@lru_cache(maxsize=1)
def pipeline() -> Pipeline:
    """One pipeline (engine, settings, gateway) per process, built on first use."""
    return Pipeline.from_env()


def run_id() -> str | None:
    """The current Prefect flow run's id, for the audit rows this run writes."""
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def actor(name: str) -> Actor:
    """The actor for the audit row, carrying the current Prefect flow run id."""
    return Actor(name, run_id())


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


def now() -> datetime:
    return datetime.now(UTC)


@task(name="store-decision", timeout_seconds=30, **RETRY)
def store_decision(request: ReturnRequestIn) -> dict[str, Any]:
    """Decide the request and store it with its RMA and outbox rows; idempotent per idempotency key (the flow run's
    id when the caller sent none, so a retry after a lost commit reply replays instead of asking again: R11)."""
    from prefect.runtime import flow_run

    if request.idempotency_key is None and flow_run.id:
        request = request.model_copy(update={"idempotency_key": f"flow-run-{flow_run.id}"})
    return pipeline().request(request, now(), actor("api"))


@task(name="render-label", timeout_seconds=30, **RETRY)
def render_label(rma: str) -> str | None:
    """Write the label PDF under RETURNS_HOME/labels; deterministic, skipped when present."""
    return pipeline().render_label(rma)


@task(name="record-receipt", timeout_seconds=30, **RETRY)
def record_receipt(receipt: ReceiptIn) -> dict[str, Any]:
    """Log the parcel with per-unit condition, start the 10-day clock (P8) and claim it for processing, in one
    transaction; a retry of the same receipt replays."""
    return pipeline().receive(receipt, now(), run_id(), claim=True)


@task(name="claim-return", timeout_seconds=30, **RETRY)
def claim_return(rma: str, who: str = "api") -> bool:
    """received -> processing under a lease; False when another worker holds it or it is done."""
    return pipeline().claim(rma, now(), actor(who))


@task(name="pay-refund", timeout_seconds=60, **RETRY)
def pay_refund(rma: str) -> dict[str, Any]:
    """Pay the refund through the gateway with keys refund:<RMA>:<payment>; a retry never pays twice."""
    p = pipeline()
    plan = p.plan_refund(rma)
    references = p.pay(plan)
    return {"references": {str(k): v for k, v in references.items()}, "total": str(plan.settlement.refund_total)}


@task(name="complete-return", timeout_seconds=30, **RETRY)
def complete_return(rma: str, paid: dict[str, Any], who: str = "api") -> dict[str, Any]:
    """Record the refund and complete the return with its 'processed' email, in one transaction."""
    p = pipeline()
    references = {int(k): v for k, v in paid["references"].items()}
    return p.complete(rma, p.plan_refund(rma), references, now(), actor(who))


@task(name="settle-review", timeout_seconds=30, **RETRY)
def settle_review(rma: str, authorize: bool, note: str, by: str) -> dict[str, Any]:
    """An operator's decision on a return in review."""
    return pipeline().review(rma, authorize, note, by, now(), run_id())


@task(name="cancel-return", timeout_seconds=30, **RETRY)
def cancel_return(rma: str, note: str, by: str) -> dict[str, Any]:
    """Withdraw an authorized return."""
    return pipeline().cancel(rma, note, by, now(), run_id())


@task(name="send-outbox", timeout_seconds=120, **RETRY)
def send_outbox() -> dict[str, Any]:
    """Deliver pending emails (at least once, stable Message-IDs); failures stay visible in the outbox."""
    return pipeline().relay(now())


@task(name="import-catalog", timeout_seconds=120, **RETRY)
def import_catalog(data: ImportIn) -> dict[str, int]:
    """Upsert products, customers and orders."""
    return pipeline().import_data(data)


@task(name="plan-sweep", timeout_seconds=60, **RETRY)
def plan_sweep(as_of: datetime) -> dict[str, list[str]]:
    """The RMAs the sweep must act on at `as_of`."""
    plan = pipeline().sweep_plan(as_of)
    return {"expire": plan.expire, "due_soon": plan.due_soon, "overdue": plan.overdue, "redrive": plan.redrive}


@task(name="expire-rmas", timeout_seconds=300, **RETRY)
def expire_rmas(rmas: list[str], as_of: datetime) -> list[str]:
    """R8: expire each lapsed RMA in its own short transaction (a retry skips the done ones)."""
    return [r for r in rmas if pipeline().expire(r, as_of, run_id())]


@task(name="escalate-deadlines", timeout_seconds=300, **RETRY)
def escalate_deadlines(due_soon: list[str], overdue: list[str], as_of: datetime) -> dict[str, list[str]]:
    """R9: tell Customer Care once per return that it is due soon, and once that it is overdue."""
    p = pipeline()
    return {"due_soon": [r for r in due_soon if p.escalate(r, Flag.DUE_SOON, as_of)],
            "overdue": [r for r in overdue if p.escalate(r, Flag.OVERDUE, as_of)]}


@task(name="redrive-stuck", timeout_seconds=600, **RETRY)
def redrive_stuck(rmas: list[str], as_of: datetime) -> list[str]:
    """Finish returns left in received/processing past their lease (a crashed worker); pays at most once; one the
    gateway refuses for good is parked in review, not left to fail this task (and the sweep) every hour."""
    # The lease is judged at as_of, as the candidates were (the same as Pipeline.sweep): a replayed sweep re-drives
    # what it found stuck.
    return [rma for rma in rmas if pipeline().redrive(rma, as_of, actor("sweep"))]


@task(name="render-missing-labels", timeout_seconds=300, **RETRY)
def render_missing_labels() -> list[str]:
    """Labels for authorized RMAs whose PDF is missing (a crash between commit and render)."""
    p = pipeline()
    return [r for r in p.missing_labels() if p.render_label(r)]


@task(name="publish-board", timeout_seconds=30, cache_policy=NO_CACHE, persist_result=False)
def publish_board(as_of: datetime) -> dict[str, Any]:
    """The operators' board artifact: counts per state, due soon, overdue, stuck."""
    from tasks.visibility import publish_board as publish

    board = pipeline().board(as_of)
    publish(board)
    return board


@task(name="publish-return", timeout_seconds=30, cache_policy=NO_CACHE, persist_result=False)
def publish(rma: str) -> None:
    """Refresh the return's artifact and emit an event per new transition."""
    publish_return(pipeline(), rma, run_id())


@task(name="notify", timeout_seconds=120, **RETRY)
def notify(rma: str | None) -> dict[str, Any]:
    """The stage's emails (the outbox, at least once) and what operators see (the return's artifact, its events).

    One task run for both: each task run costs the Prefect server ~25-30 ms of CPU (PREFECT-NOTES.md), so the
    per-return stages keep their side effects as tasks and fold the two reporting steps into one.
    """
    report = pipeline().relay(now())
    if rma:
        publish_return(pipeline(), rma, run_id())
    return {k: len(v) for k, v in report.items() if isinstance(v, list)}
