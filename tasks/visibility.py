"""What operators see in Prefect: one artifact per return, an event per transition, the sweep's board."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from adapters.clock import utcnow
from models.policy import Policy
from service.results import Board
from service.steps import Pipeline

BOARD_KEY = "returns-board"
EVENT_NAMESPACE = uuid.UUID("6f1c2a52-8e0b-4a53-9a55-3d1f0c9e2b71")


def artifact_key(rma: str) -> str:
    """Artifact keys are lowercase with dashes: return-rma-7k2qmxp."""
    return f"return-{rma.lower()}"


def _cell(value: object) -> str:
    return str(value if value is not None else "").replace("|", "/").replace("\n", " ")


def return_markdown(shown: dict[str, Any]) -> str:
    """The return's page: state, money, deadline, the clauses cited, each line, the timeline (ids only) and what the
    customer was told (email subjects and times, the status page)."""
    out = [
        f"# {shown['rma_number']} - {shown['state']}",
        "",
        f"Order **{shown['order_number']}** | reason `{shown['reason']}` | resolution `{shown['resolution']}` | "
        f"policy `{shown['policy_version']}` | clauses {', '.join(shown['clauses'])}",
        "",
        f"Refund total **${shown['refund_total']}**"
        + (f" | RMA valid until {shown['rma_valid_until'][:10]}" if shown.get("rma_valid_until") else "")
        + (f" | received {shown['received_at'][:16]}" if shown.get("received_at") else "")
        + (f" | deadline **{shown['deadline'][:16]}**" if shown.get("deadline") else "")
        + (f" ({shown['deadline_flag']})" if shown.get("deadline_flag") else ""),  # None once the return is closed
        "",
        "| sku | qty | decision | clauses | refund | fee | received (u/o/d/m) | settled | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ln in shown["lines"]:
        rc = ln["received"]
        received = f"{rc['unopened']}/{rc['opened']}/{rc['damaged']}/{rc['missing']}" if rc else ""
        out.append(f"| {ln['sku']} | {ln['quantity']} | {ln['decision']} | {' '.join(ln['clauses'])} | "
                   f"{ln['refund']} | {ln['restocking_fee']} | {received} | {_cell(ln['settled_refund'])} | "
                   f"{_cell(ln['note'] or ln['reason'])} |")
    if shown["payments_refunded"]:
        out += ["", "Refunded: " + ", ".join(f"{p['method']} {p['last4'] or ''} ${p['amount']} ({p['reference']})"
                                             for p in shown["payments_refunded"])]
    out += ["", "| when (UTC) | from | to | by | flow run |", "|---|---|---|---|---|"]
    for t in shown["timeline"]:
        out.append(f"| {t['at'][:19]} | {_cell(t['from'])} | {t['to']} | {t['actor']} | {_cell(t['flow_run_id'])} |")
    out += ["", "Emails: " + (", ".join(f"{m['kind']} ({m['status']})" for m in shown["emails"]) or "none")]
    out += ["", "## What the customer was told", ""] + _told(shown)
    return "\n".join(out)


def _told(shown: dict[str, Any]) -> list[str]:
    """The customer's emails by subject and time sent (pending and failed ones say so), and their status page."""
    told = [m for m in shown["emails"] if m.get("to_customer")]
    out = ["| sent (UTC) | subject |", "|---|---|"] if told else ["No email to the customer yet."]
    for m in told:
        when = m["sent_at"][:19] if m.get("sent_at") else f"not sent ({m['status']}, {m['attempts']} attempts)"
        out.append(f"| {when} | {_cell(m.get('subject') or m['kind'])} |")
    return out + ["", f"Shopper's status page (the link in their emails): {shown['status_page']}"]


def publish_return(pipeline: Pipeline, rma: str, flow_run_id: str | None = None) -> None:
    """Write the return's artifact (a new version under its stable key) and emit its transitions as events:
    those `flow_run_id` made when given (each run publishes its own), else all; and a due-soon/overdue flag."""
    shown = pipeline.show(rma, utcnow())
    create_markdown_artifact(key=artifact_key(rma), markdown=return_markdown(shown),
                             description=f"Return {rma} for order {shown['order_number']}")
    resource = {"prefect.resource.id": f"returns.rma.{rma}", "prefect.resource.name": rma,
                "returns.order": str(shown["order_number"])}
    for i, t in enumerate(shown["timeline"]):
        if flow_run_id and t["flow_run_id"] != flow_run_id:
            continue
        # A deterministic id per transition: publishing again does not duplicate the event.
        emit_event(
            event=f"returns.{t['to']}", resource=resource, occurred=datetime.fromisoformat(t["at"]),
            payload={"from": t["from"], "to": t["to"], "actor": t["actor"], "flow_run_id": t["flow_run_id"]},
            id=uuid.uuid5(EVENT_NAMESPACE, f"{rma}:{i}:{t['to']}:{t['at']}"),
        )
    if shown.get("deadline_flag") in ("due_soon", "overdue"):
        # R9 flags are not states, but automations must be able to act on a deadline breach.
        emit_event(event=f"returns.{shown['deadline_flag']}", resource=resource,
                   payload={"deadline": shown["deadline"], "state": shown["state"]},
                   id=uuid.uuid5(EVENT_NAMESPACE, f"{rma}:{shown['deadline_flag']}:{shown['deadline']}"))


def artifact_link(rma: str) -> str:
    """A markdown link to the return's artifact in the Prefect UI (its page by key: the latest version)."""
    from prefect.settings import get_current_settings

    base = (get_current_settings().ui_url or "").rstrip("/")  # relative to the UI's host when not configured
    return f"[{rma}]({base}/artifacts/key/{artifact_key(rma)})"


def _when(t: datetime | None) -> str:
    return t.isoformat()[:16].replace("T", " ") if t else ""


def _short(text: str, limit: int = 90) -> str:
    """A board cell stays one line; the return's artifact and Customer Care's email have the whole text."""
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["", f"## {title}: {len(rows)}", ""]
    if rows:
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows[:200]]
    return out


def board_markdown(board: Board, policy: Policy) -> str:
    """The sweep's board: counts per state and, as tables linking to each return's artifact, what waits for a person
    (times in UTC)."""
    lines = [f"# Returns board at {board.as_of.isoformat()[:16]} UTC", "", "| state | returns |", "|---|---|"]
    lines += [f"| {state} | {n} |" for state, n in sorted(board.counts.items())]
    deadline = f"the {policy.processing_days}-day deadline"
    lines += _table("Escalated to Customer Care (by an automation: overdue, or a stage run failed)",
                    ["return", "order", "escalated at", "why (state now)", "deadline"],
                    [[artifact_link(r.rma), r.order_number, _when(r.since), r.why, _when(r.deadline)]
                     for r in board.escalated])
    lines += _table("In review (a person decides: settle-review)", ["return", "order", "since", "deadline", "why"],
                    [[artifact_link(r.rma) if r.rma.startswith("RMA-") else r.rma, r.order_number, _when(r.since),
                      _when(r.deadline), _short(r.why)] for r in board.in_review])
    for title, items in ((f"Due soon (R9: within {policy.escalate_before_hours} h of {deadline})", board.due_soon),
                         (f"Overdue (R9: past {deadline})", board.overdue),
                         ("Stuck (past the processing lease; the sweep re-drives them)", board.stuck),
                         ("Waiting for the payment provider (a pending refund: its webhook or the sweep completes it)",
                          board.awaiting_provider)):
        lines += _table(title, ["return", "deadline"],
                        [[artifact_link(r), _when(board.deadlines.get(r))] for r in items])
    lines += _table("RMAs about to expire (R8: no parcel yet)", ["return", "order", "valid until"],
                    [[artifact_link(r.rma), r.order_number, _when(r.deadline)] for r in board.expiring])
    lines += _table("Expired in the last 7 days (R8: the customer got the 'expired' email)",
                    ["return", "order", "valid until", "expired at"],
                    [[artifact_link(r.rma), r.order_number, _when(r.deadline), _when(r.since)] for r in board.expired])
    return "\n".join(lines)


def publish_board(board: Board, policy: Policy) -> None:
    """Write the board artifact (a new version under the stable key `returns-board`)."""
    create_markdown_artifact(key=BOARD_KEY, markdown=board_markdown(board, policy),
                             description="What waits for a person: escalated, in review, due soon, overdue, stuck, "
                                         "expiring, expired")
