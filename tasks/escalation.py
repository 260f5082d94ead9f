"""The escalation's tasks: record it (with Customer Care's email) once per return, and refresh the board."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from adapters.clock import utcnow
from tasks.returns import RETRY, pipeline
from tasks.visibility import publish_board


@task(name="record-escalation", timeout_seconds=30, **RETRY)
def record_escalation(rma: str, cause: str, source: str | None) -> bool:
    """Record the escalation and enqueue Customer Care's email in one transaction; False if escalated before."""
    return pipeline().escalate_return(rma, cause, source, utcnow())


@task(name="publish-board", timeout_seconds=30, cache_policy=NO_CACHE, persist_result=False)
def refresh_board() -> None:
    """The operators' board artifact as of now, so an escalation shows without waiting for the hourly sweep."""
    p = pipeline()
    publish_board(p.board(utcnow()), p.policy)
