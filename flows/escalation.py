"""The escalation flow: what the automations in prefect.yaml run for a return that needs Customer Care now."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.returns import FLOW_OPTIONS
from tasks.escalation import record_escalation, refresh_board
from tasks.returns import notify


@flow(name="escalate-return", flow_run_name="escalate-{rma}", **FLOW_OPTIONS)
def escalate_return(rma: str, cause: str, failed_run: str | None = None) -> dict[str, Any]:
    """record the escalation (once per return) -> email Customer Care with the case -> the return's artifact and
    the board show it.

    Args:
        rma: The return's RMA number.
        cause: The event that escalated it: returns.overdue, prefect.flow-run.Failed or prefect.flow-run.Crashed.
        failed_run: The id of the stage flow run that failed or crashed, if that was the cause.
    """
    escalated = record_escalation(rma, cause, failed_run)
    notify(rma)  # sends this return's pending emails (the escalation's among them) and refreshes its artifact
    if escalated:
        refresh_board()
    return {"rma_number": rma, "escalated": escalated}
