"""Escalating a return to Customer Care, as the automations ask: recorded once per return, emailed once."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from adapters.config import Settings
from models.errors import InvalidInput
from models.money import from_cents
from models.policy import Policy
from models.tables import Escalation
from service import returns as svc

# What each automation's event means for Customer Care; any other cause is refused (changes nothing).
CAUSES = {
    "returns.overdue": "it passed its processing deadline (10 days from receipt) and is still open",
    "prefect.flow-run.Failed": "a pipeline run for it failed, so it will not move on by itself",
    "prefect.flow-run.Crashed": "a pipeline run for it crashed, so it will not move on by itself",
}


def escalate(session: Session, rma: str, cause: str, source: str | None, now: datetime, policy: Policy,
             settings: Settings) -> None:
    """Record the escalation and enqueue Customer Care's email in the caller's transaction; a return escalated
    before makes the flush raise IntegrityError (the unique return id), and the caller's rollback drops both."""
    if cause not in CAUSES:
        raise InvalidInput(f"unknown escalation cause {cause[:60]!r}; expected one of {', '.join(sorted(CAUSES))}")
    ret = svc.load_return(session, rma)
    assert ret.id is not None and ret.rma is not None
    session.add(Escalation(return_id=ret.id, rma=ret.rma, cause=cause, source=source, escalated_at=now))
    session.flush()
    lines = svc._lines(session, ret)
    svc._email(session, ret, "escalated", {
        "why": CAUSES[cause], "state": str(ret.state), "flow_run_id": source,
        "received_on": policy.local_date(ret.received_at).isoformat() if ret.received_at else None,
        "deadline": ret.deadline_at.isoformat() if ret.deadline_at else None,
        "refund_total": str(from_cents(ret.refund_total_cents)),
        "lines": [{"sku": ln.sku, "quantity": ln.quantity, "decision": str(ln.outcome)} for ln in lines],
    }, now, settings, to_care=True)
