"""The stage flows of a return; each reads as the stage list in DESIGN.md."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow
from pydantic import AwareDatetime

from models.schemas import ReceiptIn, ReceiptLineIn, RequestLineIn, ReturnRequestIn, parse
from tasks import returns as t

FLOW_OPTIONS: dict[str, Any] = {"persist_result": False, "log_prints": False}


@flow(name="request-return", flow_run_name="request-{order_number}", **FLOW_OPTIONS)
def request_return(
    order_number: str,
    email: str,
    reason: Literal["unwanted", "damaged", "shipping_error", "wrong_product"],
    lines: list[RequestLineIn],
    resolution: Literal["refund", "replacement", "exchange"] | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """request -> eligibility -> RMA number + label PDF -> 'RMA issued' (or 'declined') email."""
    request = parse(ReturnRequestIn, {
        "order_number": order_number, "email": email, "reason": reason, "resolution": resolution,
        "lines": [ln.model_dump() if isinstance(ln, RequestLineIn) else ln for ln in lines],
        "idempotency_key": idempotency_key,
    })
    decision = t.store_decision(request)
    rma = decision.get("rma_number")
    if rma and decision["state"] == "authorized":
        t.render_label(rma)
    t.notify(rma)
    return {k: decision[k] for k in ("decision", "rma_number", "state", "refund_total", "clauses")}


def _refund(rma: str, who: str) -> dict[str, Any]:
    """pay the refund -> complete with the 'processed' email (the return is claimed)."""
    paid = t.pay_refund(rma)
    return t.complete_return(rma, paid, who)


@flow(name="record-receipt", flow_run_name="receipt-{rma}", **FLOW_OPTIONS)
def record_receipt(
    rma: str, lines: list[ReceiptLineIn], received_at: AwareDatetime | None = None, by: str = "dock"
) -> dict[str, Any]:
    """receipt at Lantana (per-unit condition) -> 10-day clock -> processing starts at once -> emails.

    Args:
        rma: The RMA number written on the box, e.g. RMA-7K2QMXP.
        lines: One entry per SKU on the RMA (the return's artifact lists them): how many units arrived unopened,
            opened, damaged, or are missing. They must add up to the units on the RMA.
        received_at: When the parcel arrived; leave empty for now.
        by: Who at the dock logged it.
    """
    arrived = received_at or t.now()
    receipt = parse(ReceiptIn, {"rma": rma, "received_at": arrived.isoformat(), "by": by,
                                "lines": [ln.model_dump() if isinstance(ln, ReceiptLineIn) else ln for ln in lines]})
    out = t.record_receipt(receipt)
    if out["state"] == "processing":
        out = _refund(out["rma_number"], f"operator:{by}")
    t.notify(out["rma_number"])
    return out


@flow(name="process-return", flow_run_name="process-{rma}", **FLOW_OPTIONS)
def process_return(rma: str) -> dict[str, Any] | None:
    """Refund (or ship the replacement / exchange) a received return, then the 'processed' email."""
    out = _refund(rma, "api") if t.claim_return(rma, "api") else None
    t.notify(rma)
    return out


@flow(name="settle-review", flow_run_name="review-{rma}", **FLOW_OPTIONS)
def settle_review(rma: str, authorize: bool, note: str, by: str) -> dict[str, Any]:
    """An operator's decision on a return in review: authorize (RMA + label, or processing) or decline.

    Args:
        rma: The return's RMA number (a return in review has one already).
        authorize: On to issue the RMA (before receipt) or pay the return (after it); off to decline it.
        note: Why: it goes in the audit log and, on a decline, to the customer.
        by: The operator's name.
    """
    out = t.settle_review(rma, authorize, note, by)
    if out["state"] == "authorized":
        t.render_label(rma)
    elif out["state"] == "processing":
        out = _refund(rma, f"operator:{by}")
    t.notify(rma)
    return out


@flow(name="cancel-return", flow_run_name="cancel-{rma}", **FLOW_OPTIONS)
def cancel_return(rma: str, note: str, by: str) -> dict[str, Any]:
    """Withdraw an authorized return; its units become returnable again."""
    out = t.cancel_return(rma, note, by)
    t.notify(rma)
    return out


@flow(name="deadline-sweep", flow_run_name="sweep", **FLOW_OPTIONS)
def deadline_sweep(as_of: AwareDatetime | None = None) -> dict[str, Any]:
    """Expire lapsed RMAs (R8), escalate due-soon and overdue returns (R9), re-drive stuck ones; the board."""
    moment = as_of or t.now()
    plan = t.plan_sweep(moment)
    expired = t.expire_rmas(plan["expire"], moment)
    escalated = t.escalate_deadlines(plan["due_soon"], plan["overdue"], moment)
    redriven = t.redrive_stuck(plan["redrive"], moment)
    labels = t.render_missing_labels()
    t.send_outbox()
    for rma in sorted(set(expired) | set(escalated["due_soon"]) | set(escalated["overdue"]) | set(redriven)):
        t.publish(rma)
    board = t.publish_board(moment)
    return {"as_of": moment.isoformat(), "expired": expired, **escalated, "processed": redriven, "labels": labels,
            "board": board}


@flow(name="outbox-relay", flow_run_name="relay", **FLOW_OPTIONS)
def outbox_relay() -> dict[str, Any]:
    """Send every pending email; failures stay visible on their outbox rows."""
    return t.send_outbox()
