"""What a storefront and a shopper see of a return: the stored decision and state in customer words, with links;
never who at the shop acted, nor any flow run. The response models are the OpenAPI document's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from service.results import Decided

Decision = Literal["authorized", "declined", "review"]

# Each state as the customer reads it in the timeline.
STATE_WORDS = {
    "requested": "We received your return request.",
    "authorized": "Your RMA was issued: print the label, write the RMA on the box and send it to Lantana.",
    "declined": "Your request was declined; each item says why.",
    "review": "Customer Care is reviewing your return; we will email you.",
    "received": "Your parcel arrived at our Lantana warehouse; we process it within 10 days (P8).",
    "processing": "We are processing your return.",
    "completed": "Your return is processed: the refund or the replacement is on its way.",
    "expired": "The RMA expired before a parcel arrived (R8); you may ask again.",
    "cancelled": "The return was cancelled.",
}


class LineOut(BaseModel):
    sku: str
    quantity: int
    decision: Decision
    basis: str
    clauses: list[str]
    reason: str
    refund: str
    restocking_fee: str
    exchange_sku: str | None = None


class UnitsOut(BaseModel):
    sku: str
    name: str
    quantity_shipped: int
    quantity_left: int


class DecisionOut(BaseModel):
    """A decision (R14) with each line's clauses and reason, as the command line prints it."""

    decision: Decision
    policy_version: str
    reason: str
    resolution: str
    clauses: list[str]
    summary: str
    lines: list[LineOut]
    refund_total: str
    prepaid_label: bool


class QuoteOut(DecisionOut):
    """The decision a request would get (nothing is written), and what each order line has left to return."""

    units: list[UnitsOut]


class ReturnCreated(DecisionOut):
    """A stored request's decision, with where to follow it."""

    request: str
    rma_number: str | None
    state: str
    status_url: str
    label_url: str | None


class ReturnPending(BaseModel):
    """The request is stored and its flow has not finished yet: follow `status_url`."""

    request: str
    status: Literal["pending"]
    status_url: str


class TimelineOut(BaseModel):
    at: str
    state: str
    text: str


class ReceivedOut(BaseModel):
    unopened: int
    opened: int
    damaged: int
    missing: int


class StatusLineOut(BaseModel):
    sku: str
    quantity: int
    decision: Decision
    clauses: list[str]
    reason: str
    refund: str
    restocking_fee: str
    received: ReceivedOut | None


class PaymentOut(BaseModel):
    method: str
    last4: str | None
    amount: str


class ReturnStatus(BaseModel):
    """A return as its customer may read it."""

    rma_number: str
    order_number: str
    state: str
    status_text: str
    reason: str
    resolution: str
    clauses: list[str]
    refund_total: str
    requested_at: str
    rma_valid_until: str | None
    received_at: str | None
    deadline: str | None
    completed_at: str | None
    lines: list[StatusLineOut]
    timeline: list[TimelineOut]
    payments_refunded: list[PaymentOut]
    status_url: str
    label_url: str | None


class OrderReturns(BaseModel):
    order_number: str
    returns: list[ReturnStatus]


def has_label(state: str) -> bool:
    """States in which the RMA has been issued, so its label exists (or can be made again)."""
    return state in ("authorized", "received", "processing", "completed")


def created(reference: str, decided: Decided) -> dict[str, Any]:
    """The 201 body: the stored decision, the RMA, and links."""
    d, rma = decided.decision, decided.rma_number
    return {"request": reference, "rma_number": rma, "state": str(decided.state),
            **{k: d[k] for k in ("decision", "policy_version", "reason", "resolution", "clauses", "summary",
                                 "lines", "refund_total", "prepaid_label")},
            "status_url": f"/v1/returns/{rma}" if rma else f"/v1/requests/{reference}",
            "label_url": f"/v1/returns/{rma}/label.pdf" if rma and decided.authorized else None}


def pending(reference: str) -> dict[str, Any]:
    return {"request": reference, "status": "pending", "status_url": f"/v1/requests/{reference}"}


def status(shown: dict[str, Any]) -> dict[str, Any]:
    """A return's `show` in the customer's words: no actors, no flow runs, no emails."""
    rma, state = shown["rma_number"], str(shown["state"])
    return {
        **{k: shown[k] for k in ("rma_number", "order_number", "reason", "resolution", "clauses", "refund_total",
                                 "requested_at", "rma_valid_until", "received_at", "deadline", "completed_at")},
        "state": state, "status_text": STATE_WORDS.get(state, state),
        "lines": [{k: ln[k] for k in ("sku", "quantity", "decision", "clauses", "reason", "refund",
                                      "restocking_fee", "received")} for ln in shown["lines"]],
        "timeline": [{"at": t["at"], "state": str(t["to"]), "text": STATE_WORDS.get(str(t["to"]), str(t["to"]))}
                     for t in shown["timeline"] if str(t["to"]) != "processing"],
        "payments_refunded": [{k: p[k] for k in ("method", "last4", "amount")} for p in shown["payments_refunded"]],
        "status_url": f"/v1/returns/{rma}",
        "label_url": f"/v1/returns/{rma}/label.pdf" if has_label(state) else None,
    }
