"""The stage flows of a return: each hands its event to the stage (service/stages.py) with Prefect tasks as steps,
so every step is a visible task run, and answers JSON at the edge."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast
from uuid import UUID

from prefect import flow
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from pydantic import AwareDatetime, ValidationError

from adapters.clock import utcnow
from flows import FLOW_OPTIONS
from models.errors import InvalidInput, NotFound, StaleState
from models.policy import Reason, Resolution
from models.review import Decision, ReviewReason, review_note
from models.rma import parse_rma
from models.schemas import ParcelIn, ReceiptIn, ReceiptLineIn, RequestLineIn, ReturnRequestIn, explain, parse
from service import stages
from service.returns import Actor
from tasks.returns import RELAY_REPORT, TASKS, pipeline, send_outbox


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
    rma: str, lines: list[ReceiptLineIn] | None = None, received_at: AwareDatetime | None = None, by: str = "dock"
) -> dict[str, Any]:
    """receipt at Lantana -> 10-day clock -> processing starts at once -> emails. Scan the label: that is all for a
    parcel whose every unit arrived unopened.

    Args:
        rma: The RMA number: scan the label's barcode (Code 39) or type what is written on the box, e.g. RMA-7K2QMXP.
        lines: Only the exceptions, if any: per SKU, how many units arrived opened, damaged or missing. Every
            other unit on the RMA is counted as arrived unopened. Leave empty when all arrived unopened.
        received_at: When the parcel arrived; leave empty for now.
        by: Who at the dock logged it.
    """
    return stages.after_receipt(TASKS, receipt_of(rma, lines or [], received_at, by)).to_json()


def receipt_of(rma: str, lines: list[Any], received_at: datetime | None, by: str) -> ReceiptIn:
    """The parcel's receipt, validated; a refusal is one line naming the field (no RMA scanned included)."""
    parse_rma(rma)  # no RMA, another shop's format or a wrong check character: the dock's words, not pydantic's
    try:
        return parse(ReceiptIn, {"rma": rma, "received_at": (received_at or utcnow()).isoformat(), "by": by,
                                 "lines": _plain(lines)})
    except ValidationError as exc:
        raise InvalidInput(f"invalid receipt: {explain(exc)}") from None


@flow(name="dock-session", flow_run_name="dock-session", **FLOW_OPTIONS)
def dock_session(parcels: list[ParcelIn], by: str = "dock", received_at: AwareDatetime | None = None) -> dict[str, Any]:
    """Many parcels at once, each recorded in its own transaction: one bad label refuses only its own parcel.

    Args:
        parcels: One entry per parcel: its RMA as scanned and, if any, its exceptions (per SKU, units opened,
            damaged or missing); every other unit on the RMA is counted as arrived unopened.
        by: Who at the dock logged them.
        received_at: When they arrived; leave empty for now.
    """
    progress = cast(UUID, create_progress_artifact(0.0, description=f"Dock session: {len(parcels)} parcels"))
    rows: list[dict[str, Any]] = []
    for n, parcel in enumerate(parcels, start=1):
        try:
            out = stages.after_receipt(TASKS, receipt_of(parcel.rma, parcel.lines, received_at, by))
            rows.append({"parcel": n, "rma": out.rma_number, "result": "received", "state": str(out.state),
                         "why": ""})
        except (InvalidInput, NotFound, StaleState) as exc:
            rows.append({"parcel": n, "rma": parcel.rma.strip()[:40], "result": "refused", "state": "",
                         "why": str(exc)[:300]})
        except Exception as exc:  # noqa: BLE001 - one parcel's failure (after its retries) never stops the others
            rows.append({"parcel": n, "rma": parcel.rma.strip()[:40], "result": "failed (scan it again)",
                         "state": "", "why": type(exc).__name__})
        update_progress_artifact(progress, 100.0 * n / max(len(parcels), 1))
    received = sum(r["result"] == "received" for r in rows)
    create_table_artifact(key="dock-session", table=rows, description=f"Dock session by {by}: {received} received, "
                          f"{len(rows) - received} refused or failed, of {len(rows)} parcels")
    return {"received": received, "refused": len(rows) - received, "parcels": rows}


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
def settle_review(rma: str, decision: Decision, reason: ReviewReason, by: str, note: str = "") -> dict[str, Any]:
    """An operator's decision on a return in review: authorize (RMA + label, or processing) or decline.

    Args:
        rma: The return's RMA number (a return in review has one already).
        decision: authorize issues the RMA (before receipt) or pays the return (after it); decline refuses it.
        reason: Why, from the list: expiry_checked (the lot's date, P4 R2), damage_confirmed (R12), not_eligible,
            customer_withdrew (both decline only), other (say why in the note).
        by: The operator's name.
        note: Anything the audit log (and, on a decline, the customer) should read; required for other.
    """
    return stages.after_review(TASKS, rma, decision is Decision.AUTHORIZE, review_note(decision, reason, note),
                               Actor.operator(by)).to_json()


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
