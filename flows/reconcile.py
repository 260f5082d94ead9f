"""The daily refund reconciliation: our recorded refunds against each provider's, the differences as a table."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from prefect import State, flow, task
from prefect.artifacts import create_table_artifact
from prefect.states import Completed, Failed
from pydantic import AwareDatetime

from adapters.clock import utcnow
from flows import FLOW_OPTIONS
from service.reconcile import Difference, reconcile
from tasks.returns import RETRY, pipeline

REPORT = "refund-reconciliation"  # the table artifact each run leaves, under one key so the UI shows its history
COLUMNS = ("provider", "payment_id", "provider_ref", "difference", "ours", "theirs")


@task(name="compare-refunds", timeout_seconds=600, **RETRY)
def compare_refunds(since: datetime, until: datetime) -> list[Difference]:
    """Read our refunds and ask the providers about the same payments; writes nothing."""
    p = pipeline()
    return reconcile(p.engine, p.providers, since, until)


@flow(name="refund-reconciliation", flow_run_name="reconcile", **FLOW_OPTIONS)
def refund_reconciliation(days: int = 1, until: AwareDatetime | None = None) -> State[dict[str, Any]]:
    """Compare the refunds recorded for payments over a period with what each provider reports for them.

    Fails (a check an automation can act on) when anything differs; the differences are the run's table artifact.

    Args:
        days: How many days back from `until` the refunds were recorded.
        until: End of the period; leave empty for now.
    """
    end = until or utcnow()
    start = end - timedelta(days=days)
    rows = [d.row() for d in compare_refunds(start, end)]
    create_table_artifact(key=REPORT, table=rows or [dict.fromkeys(COLUMNS, "-")],
                          description=f"Refunds recorded {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC that "
                                      f"differ from the providers' ({len(rows)}); ids and amounts only")
    summary = {"since": start.isoformat(), "until": end.isoformat(), "differences": len(rows)}
    if rows:
        return Failed(message=f"{len(rows)} refund(s) differ from the providers' records", data=summary)
    return Completed(message="our refunds match the providers'", data=summary)
