"""Candidate shapes of the stage flows, to measure proposals before anyone changes flows/ or tasks/.

Same deployments (names, parameters, the same service.steps calls, the same retry policy), fewer Prefect objects:

  lean   request-return: 2 task runs instead of 4 (`issue-rma` = store-decision + render-label;
         `notify` = send-outbox + publish-return); record-receipt: 3 instead of 6 (`receive-and-claim`,
         `refund` = pay-refund + complete-return, `notify`); `notify` emits only the transitions made by this
         flow run instead of the whole timeline again. Per return: 5 task runs, 2 artifacts, 5 events
         (as-is: 10, 2, 7).
  batch  `lean`, plus a `record-receipts` deployment on lantana-dock taking a list of receipts (the dock's scan
         session): one flow run and 3 task runs per batch, one artifact and the new events per return.

Only the bench uses this module (`python -m bench.pipeline --variant lean`); the flows in flows/ are unchanged.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from prefect import flow, task
from pydantic import AwareDatetime

from models.schemas import ReceiptIn, ReceiptLineIn, RequestLineIn, ReturnRequestIn, parse
from tasks.returns import RETRY, actor, now, pipeline
from tasks.visibility import EVENT_NAMESPACE, artifact_key, return_markdown

FLOW_OPTIONS: dict[str, Any] = {"persist_result": False, "log_prints": False}


def _state(rma: str) -> str:
    from adapters.db import unit_of_work
    from service import returns as svc

    with unit_of_work(pipeline().engine) as session:
        return str(svc.load_return(session, rma).state)


def publish_new(rma: str) -> None:
    """The return's artifact, and an event for each transition this flow run made (not the whole timeline)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    from service.steps import utcnow

    shown = pipeline().show(rma, utcnow())
    create_markdown_artifact(key=artifact_key(rma), markdown=return_markdown(shown),
                             description=f"Return {rma} for order {shown['order_number']}")
    mine = str(flow_run.id) if flow_run.id else None
    for i, t in enumerate(shown["timeline"]):
        if mine is not None and t["flow_run_id"] != mine:
            continue
        emit_event(
            event=f"returns.{t['to']}",
            resource={"prefect.resource.id": f"returns.rma.{rma}", "prefect.resource.name": rma,
                      "returns.order": shown["order_number"]},
            occurred=datetime.fromisoformat(t["at"]),
            payload={"from": t["from"], "to": t["to"], "actor": t["actor"], "flow_run_id": t["flow_run_id"]},
            id=uuid.uuid5(EVENT_NAMESPACE, f"{rma}:{i}:{t['to']}:{t['at']}"),
        )


@task(name="issue-rma", timeout_seconds=30, **RETRY)
def issue_rma(request: ReturnRequestIn) -> dict[str, Any]:
    """Decide and store the request (idempotent per key); when authorized, write its label (idempotent too)."""
    decision = pipeline().request(request, now(), actor("api"))
    if decision.get("rma_number") and decision["state"] == "authorized":
        pipeline().render_label(decision["rma_number"])
    return decision


@task(name="notify", timeout_seconds=120, **RETRY)
def notify(rmas: list[str]) -> dict[str, Any]:
    """Send what the outbox holds, then refresh each return's artifact and emit its new transitions."""
    sent = pipeline().relay(now())
    for rma in rmas:
        publish_new(rma)
    return sent


@task(name="receive-and-claim", timeout_seconds=30, **RETRY)
def receive_and_claim(receipt: ReceiptIn) -> str:
    """Log the parcel and claim the return for processing; resumable: a retry skips what is already done."""
    p = pipeline()
    if _state(receipt.rma) == "authorized":
        p.receive(receipt, now())
    if _state(receipt.rma) == "received":
        p.claim(receipt.rma, now(), actor(f"operator:{receipt.by}"))
    return _state(receipt.rma)


@task(name="refund", timeout_seconds=60, **RETRY)
def refund(rma: str, who: str) -> dict[str, Any]:
    """Plan, pay (keys refund:<RMA>:<payment>, so a retry never pays twice) and complete with the email."""
    p = pipeline()
    plan = p.plan_refund(rma)
    return p.complete(rma, plan, p.pay(plan), now(), actor(who))


@flow(name="request-return", flow_run_name="request-{order_number}", **FLOW_OPTIONS)
def request_return(
    order_number: str,
    email: str,
    reason: Literal["unwanted", "damaged", "shipping_error", "wrong_product"],
    lines: list[RequestLineIn],
    resolution: Literal["refund", "replacement", "exchange"] | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    request = parse(ReturnRequestIn, {
        "order_number": order_number, "email": email, "reason": reason, "resolution": resolution,
        "lines": [ln.model_dump() if isinstance(ln, RequestLineIn) else ln for ln in lines],
        "idempotency_key": idempotency_key,
    })
    decision = issue_rma(request)
    rma = decision.get("rma_number")
    notify([rma] if rma else [])
    return {k: decision[k] for k in ("decision", "rma_number", "state", "refund_total", "clauses")}


def _receipt(rma: str, received_at: datetime, lines: list[Any], by: str) -> ReceiptIn:
    return parse(ReceiptIn, {"rma": rma, "received_at": received_at.isoformat(), "by": by,
                             "lines": [ln.model_dump() if isinstance(ln, ReceiptLineIn) else ln for ln in lines]})


@flow(name="record-receipt", flow_run_name="receipt-{rma}", **FLOW_OPTIONS)
def record_receipt(rma: str, received_at: AwareDatetime, lines: list[ReceiptLineIn],
                   by: str = "dock") -> dict[str, Any]:
    receipt = _receipt(rma, received_at, lines, by)
    state = receive_and_claim(receipt)
    out: dict[str, Any] = {"rma_number": rma, "state": state}
    if state == "processing":
        out = refund(rma, f"operator:{by}")
    notify([rma])
    return out


@flow(name="record-receipts", flow_run_name="receipts-{by}", **FLOW_OPTIONS)
def record_receipts(receipts: list[dict[str, Any]], by: str = "dock") -> dict[str, Any]:
    """A dock's scan session: every parcel logged, claimed and refunded; one flow run, three task runs.
    (Receipts arrive as JSON objects and are validated here: the strict ReceiptIn refuses ISO strings for
    datetimes when Prefect validates parameters in Python mode.)"""
    states = receive_all([parse(ReceiptIn, r if isinstance(r, dict) else r.model_dump(mode="json"))
                          for r in receipts])
    done = refund_all([r for r, s in states.items() if s == "processing"], f"operator:{by}")
    notify(sorted(states))
    return {"received": len(states), "completed": len(done)}


@task(name="receive-and-claim-all", timeout_seconds=300, **RETRY)
def receive_all(receipts: list[ReceiptIn]) -> dict[str, str]:
    """Each parcel in its own short transaction (a retry skips the done ones)."""
    return {r.rma: receive_and_claim.fn(r) for r in receipts}


@task(name="refund-all", timeout_seconds=600, **RETRY)
def refund_all(rmas: list[str], who: str) -> list[str]:
    from models.errors import StaleState

    done = []
    for rma in rmas:
        try:
            refund.fn(rma, who)
            done.append(rma)
        except StaleState:
            continue  # completed by an earlier attempt of this task
    return done


def deployment_specs(variant: str) -> list[Any]:
    """flows.serve's deployments with the variant's request and receipt flows (and, for batch, record-receipts)."""
    from flows.serve import DeploymentSpec
    from flows.serve import deployment_specs as current

    specs = current()
    if variant == "as-is":
        return specs
    swap = {"request-return": request_return, "record-receipt": record_receipt}
    out = [DeploymentSpec(s.name, swap.get(s.flow.name, s.flow), s.description, s.cron, s.interval_seconds,
                          s.concurrency_limit, s.tags) for s in specs]
    if variant == "batch":
        out.insert(2, DeploymentSpec("lantana-dock", record_receipts, "A scan session of parcels at Lantana."))
    return out
