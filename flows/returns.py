"""The stage flows of a return: each hands its event to the stage (service/stages.py) with Prefect tasks as steps,
so every step is a visible task run, and answers JSON at the edge."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import AwareDatetime

from adapters.clock import utcnow
from models.errors import InvalidInput
from models.policy import Reason, Resolution
from models.schemas import ReceiptIn, ReceiptLineIn, RequestLineIn, ReturnRequestIn, parse
from service import stages
from service.returns import Actor
from tasks.returns import RELAY_REPORT, TASKS, pipeline, send_outbox

FLOW_OPTIONS: dict[str, Any] = {"persist_result": False, "log_prints": False}


def _plain(items: list[Any]) -> list[Any]:
    return [x.model_dump() if hasattr(x, "model_dump") else x for x in items]


@flow(name="request-return", flow_run_name="request-{order_number}", **FLOW_OPTIONS)
def request_return(
    order_number: str,
    reason: Reason,
    lines: list[RequestLineIn],
    email: str | None = None,
    resolution: Resolution | None = None,
    idempotency_key: str | None = None,
    request_ref: str | None = None,
) -> dict[str, Any]:
    """request -> eligibility -> RMA number + label PDF -> 'RMA issued' (or 'declined') email.

    Args:
        order_number: The order the items came on.
        reason: unwanted, damaged, shipping_error or wrong_product.
        lines: The items and quantities to return.
        email: The customer's email (R13); leave empty when `request_ref` names a request the API verified.
        resolution: refund, replacement or exchange; empty for the reason's default.
        idempotency_key: The same key replays the same request instead of asking again.
        request_ref: A request the storefront API stored after checking its owner (R13): the email stays in the
            returns database and never becomes a parameter of this run.
    """
    fields = {"order_number": order_number, "reason": reason, "resolution": resolution, "lines": _plain(lines),
              "idempotency_key": idempotency_key}
    if request_ref is not None:
        request = pipeline().verified_request(request_ref, fields)
    elif email is not None:
        request = parse(ReturnRequestIn, fields | {"email": email})
    else:
        raise InvalidInput("a request needs the customer's email, or the request_ref of a verified request")
    decided = stages.after_request(TASKS, request)
    return {k: decided.to_json()[k] for k in ("decision", "rma_number", "state", "refund_total", "clauses")}


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
    receipt = parse(ReceiptIn, {"rma": rma, "received_at": (received_at or utcnow()).isoformat(), "by": by,
                                "lines": _plain(lines)})
    return stages.after_receipt(TASKS, receipt).to_json()


@flow(name="process-return", flow_run_name="process-{rma}", **FLOW_OPTIONS)
def process_return(rma: str, by: str = "api") -> dict[str, Any] | None:
    """Refund (or ship the replacement / exchange) a received return, then the 'processed' email.

    Args:
        rma: The return's RMA number.
        by: Who asks: an operator's name, or api.
    """
    out = stages.process(TASKS, rma, Actor(by) if by == "api" else Actor.operator(by))
    return out.to_json() if out else None


@flow(name="settle-review", flow_run_name="review-{rma}", **FLOW_OPTIONS)
def settle_review(rma: str, authorize: bool, note: str, by: str) -> dict[str, Any]:
    """An operator's decision on a return in review: authorize (RMA + label, or processing) or decline.

    Args:
        rma: The return's RMA number (a return in review has one already).
        authorize: On to issue the RMA (before receipt) or pay the return (after it); off to decline it.
        note: Why: it goes in the audit log and, on a decline, to the customer.
        by: The operator's name.
    """
    return stages.after_review(TASKS, rma, authorize, note, Actor.operator(by)).to_json()


@flow(name="cancel-return", flow_run_name="cancel-{rma}", **FLOW_OPTIONS)
def cancel_return(rma: str, note: str, by: str) -> dict[str, Any]:
    """Withdraw an authorized return; its units become returnable again."""
    return stages.after_cancel(TASKS, rma, note, Actor.operator(by)).to_json()


@flow(name="deadline-sweep", flow_run_name="sweep", **FLOW_OPTIONS)
def deadline_sweep(as_of: AwareDatetime | None = None) -> dict[str, Any]:
    """Expire lapsed RMAs (R8), escalate due-soon and overdue returns (R9), re-drive stuck ones; the board."""
    return stages.sweep(TASKS, as_of or utcnow()).to_json()


@flow(name="outbox-relay", flow_run_name="relay", **FLOW_OPTIONS)
def outbox_relay() -> dict[str, Any]:
    """Send every pending email; failures stay visible on their outbox rows."""
    report = send_outbox()
    if rows := report.rows():  # an idle minute leaves no artifact: the relay runs 1,440 times a day
        create_table_artifact(key=RELAY_REPORT, table=rows,
                              description="What this relay run sent, deferred and failed (ids and kinds only)")
    return report.to_json()
