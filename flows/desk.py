"""The operators' desk: a candidate policy replayed over real history, and the weekly returns report."""

from __future__ import annotations

from datetime import date
from typing import Any

from prefect import flow

from adapters.clock import utcnow
from flows import FLOW_OPTIONS
from models.whatif import Period, PolicyChangesIn
from service.report import period_of
from tasks.desk import gather_report, publish_report, publish_what_if, replay_policy
from tasks.returns import pipeline


@flow(name="policy-what-if", flow_run_name="what-if", **FLOW_OPTIONS)
def policy_what_if(policy: PolicyChangesIn, since: date | None = None, until: date | None = None) -> dict[str, Any]:
    """candidate policy -> every stored request of the period re-decided on its own date -> what changes.

    Writes nothing to the returns database; the changes are the run's artifacts and its result.

    Args:
        policy: The numbers to change, named as on the policy; leave a field empty to keep the current value.
        since: First request date replayed (shop's time zone); empty for the first request.
        until: Last request date replayed; empty for today.
    """
    result = replay_policy(policy, Period(since, until), utcnow())
    publish_what_if(result)
    return result.to_json()


@flow(name="returns-report", flow_run_name="report", **FLOW_OPTIONS)
def returns_report(since: date | None = None, until: date | None = None) -> dict[str, Any]:
    """the period's numbers -> charts -> the report artifact.

    Args:
        since: First day of the period (shop's time zone); with both empty, the last seven whole days.
        until: Last day of the period; empty for today when `since` is given.
    """
    period = period_of(since, until, pipeline().policy, utcnow())
    numbers = gather_report(period)
    publish_report(numbers)
    return numbers.to_json()
