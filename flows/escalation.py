"""The escalation flow: what the automations in prefect.yaml run for a return that needs Customer Care now."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import flow, get_client

from flows import FLOW_OPTIONS
from models.errors import InvalidInput, NotFound, StaleState
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
    if failed_run and (why := refused(failed_run)):
        # Bad input was refused and changed nothing; the operator read why in the run (and their shell or form).
        return {"rma_number": rma, "escalated": False, "not_a_failure": why}
    escalated = record_escalation(rma, cause, failed_run)
    notify(rma)  # sends this return's pending emails (the escalation's among them) and refreshes its artifact
    if escalated:
        refresh_board()
    return {"rma_number": rma, "escalated": escalated}


REFUSALS = tuple(f"{error.__name__}:" for error in (InvalidInput, NotFound, StaleState))


def refused(flow_run_id: str) -> str | None:
    """The failed run's message if it failed by refusing its input (not a failure to escalate), else None."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(flow_run_id)).state
    message = (state.message or "") if state is not None and state.is_failed() else ""
    return message[:300] if any(kind in message for kind in REFUSALS) else None
