"""The operators' desk in Prefect: the what-if and the returns report as tasks, and the artifacts they leave."""

from __future__ import annotations

from datetime import datetime

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from adapters.charts import Bars, data_uri, report_png
from models.whatif import Period, PolicyChangesIn, WhatIf
from service import report as rpt
from service.whatif import what_if
from tasks.returns import RETRY, pipeline

WHAT_IF_TABLE = "policy-what-if"  # the changed returns, one row each
WHAT_IF_SUMMARY = "policy-what-if-summary"
REPORT = "returns-report"
WHAT_IF_COLUMNS = ("rma", "order", "requested", "decision", "refund", "fee", "changes")
TOP_SKUS = 15


def _period_text(period: Period) -> str:
    return f"{period.since or 'the start'} to {period.until or 'today'}"


@task(name="replay-policy", timeout_seconds=600, **RETRY)
def replay_policy(changes: PolicyChangesIn, period: Period, as_of: datetime) -> WhatIf:
    """Re-decide the period's stored requests under the candidate policy; writes nothing to the returns database."""
    p = pipeline()
    return what_if(p.engine, p.policy, changes, period, as_of)


def what_if_markdown(result: WhatIf) -> str:
    """The what-if's summary: the numbers changed, how many decisions change and how, and the money that moves."""
    changed = ", ".join(f"`{k}` {v['from']} -> {v['to']}" for k, v in result.policy.items()) or "nothing (the "\
        "current policy)"
    money = result.money()
    out = [f"# What-if: {changed}", "",
           f"Requests replayed ({_period_text(result.period)}, each on its own date): **{result.replayed}**; "
           f"outcomes that change: **{len(result.returns)}**", "",
           "| money (at decision) | now | candidate | moves |", "|---|---|---|---|"]
    out += [f"| {name.replace('_', ' ')} | {m['before']} | {m['after']} | {m['moves']} |" for name, m in money.items()]
    out += ["", "| change (per clause) | returns |", "|---|---|"]
    out += [f"| {kind} | {n} |" for kind, n in result.by_change.items()] or ["| none | 0 |"]
    out += ["", f"The returns themselves are the `{WHAT_IF_TABLE}` table artifact of this run."]
    return "\n".join(out)


@task(name="publish-what-if", timeout_seconds=60, **RETRY)
def publish_what_if(result: WhatIf) -> None:
    """The summary as markdown and the changed returns as a table (ids and amounts only)."""
    create_markdown_artifact(key=WHAT_IF_SUMMARY, markdown=what_if_markdown(result),
                             description="A candidate policy replayed over stored requests")
    rows = [r.row() for r in result.returns]
    create_table_artifact(key=WHAT_IF_TABLE, table=rows or [dict.fromkeys(WHAT_IF_COLUMNS, "-")],
                          description=f"Returns whose outcome changes under the candidate policy ({len(rows)}); "
                                      "money at decision, before -> after")


@task(name="gather-report", timeout_seconds=600, **RETRY)
def gather_report(period: Period) -> rpt.Report:
    """The period's numbers from the returns database; reads only."""
    p = pipeline()
    return rpt.report(p.engine, p.policy, period)


def report_charts(r: rpt.Report) -> bytes:
    """The report's charts as one PNG."""
    top = r.rates[:TOP_SKUS]
    panels = [
        Bars("Returns in the period", ["requested", "authorized", "declined", "review", "completed", "expired"],
             [r.requested, r.authorized, r.declined, r.review, r.completed, r.expired]),
        Bars("Lines declined at request, per clause", list(r.declined_lines), list(r.declined_lines.values()),
             horizontal=True),
        Bars(f"Return rate per SKU (orders placed in the period, top {TOP_SKUS})", [s.sku for s in top],
             [s.rate for s in top], horizontal=True, percent=True),
        Bars("Reasons", list(r.reasons), list(r.reasons.values())),
    ]
    return report_png(panels, r.processing_days_taken, r.processing_days)


def report_markdown(r: rpt.Report, png: bytes) -> str:
    """The report's page: the charts inline (a data: URI the UI shows as is) and the numbers as tables."""
    pr = r.processing()
    share = "-" if pr["share_within_deadline"] is None else f"{pr['share_within_deadline']:.0%}"
    out = [f"# Returns {_period_text(r.period)}", "", f"![charts]({data_uri(png)})", "",
           "| returns | count |", "|---|---|",
           f"| requested | {r.requested} |", f"| authorized (RMA issued) | {r.authorized} |",
           f"| declined | {r.declined} |", f"| sent to review | {r.review} |", f"| completed | {r.completed} |",
           f"| RMAs expired (R8) | {r.expired} |", "",
           f"Refunds paid **${r.refunds_paid}** | restocking fees **${r.restocking_fees}** (returns completed in the "
           "period)", "",
           f"Receipt to processed: p50 {pr['p50_days']} d, p90 {pr['p90_days']} d, max {pr['max_days']} d; "
           f"within the {r.processing_days} days (P8): **{share}** ({pr['within_deadline']} of {pr['returns']})", "",
           "| lines declined per clause | lines |", "|---|---|"]
    out += [f"| {k} | {n} |" for k, n in r.declined_lines.items()] or ["| none | 0 |"]
    out += ["", "| reason | requests |", "|---|---|"]
    out += [f"| {k} | {n} |" for k, n in r.reasons.items()] or ["| none | 0 |"]
    out += ["", "| sku | units sold | on a return | rate |", "|---|---|---|---|"]
    out += [f"| {s.sku} | {s.sold} | {s.returned} | {s.rate:.1%} |" for s in r.rates] or ["| none | 0 | 0 | - |"]
    if r.expired_rmas:
        out += ["", "Expired: " + ", ".join(r.expired_rmas)]
    out += ["", "Return rate: units on orders placed in the period that are on a return not declined, expired or "
                "cancelled, against units sold on them."]
    return "\n".join(out)


@task(name="publish-report", timeout_seconds=120, **RETRY)
def publish_report(r: rpt.Report) -> None:
    """The report artifact, charts inline; ids and amounts only."""
    create_markdown_artifact(key=REPORT, markdown=report_markdown(r, report_charts(r)),
                             description=f"Returns {_period_text(r.period)}: counts, money, rates, timings")
