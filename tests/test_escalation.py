"""Escalations (one per return, Customer Care emailed) and the board's lists, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlmodel import col

from adapters.db import unit_of_work
from models.errors import InvalidInput, NotFound
from models.rma import new_rma
from models.schemas import ReceiptIn, ReturnRequestIn, parse
from models.tables import Escalation, OutboxMessage
from service.steps import EXPIRED_SHOWN, EXPIRY_WARNING, Pipeline
from tasks.visibility import board_markdown
from tests.helpers import API, LATER, NOW, receive, sweep

SAMPLE = Path(__file__).resolve().parent.parent / "sample"
BY_ORDER: dict[str, dict[str, Any]] = {
    s["request"]["order_number"]: s["request"]
    for s in json.loads((SAMPLE / "requests.json").read_text(encoding="utf-8"))}


def ask(p: Pipeline, order: str) -> str:
    decided = p.request(parse(ReturnRequestIn, BY_ORDER[order]), NOW, API)
    assert decided.rma_number
    return decided.rma_number


def received(p: Pipeline, order: str) -> str:
    rma = ask(p, order)
    lines = [{"sku": ln["sku"], "unopened": ln["quantity"]} for ln in BY_ORDER[order]["lines"]]
    receive(p, parse(ReceiptIn, {"rma": rma, "received_at": LATER.isoformat(), "lines": lines, "by": "dock"}))
    return rma


def counts(p: Pipeline) -> tuple[int, int]:
    with unit_of_work(p.engine) as s:
        rows = s.scalar(select(func.count()).select_from(Escalation))
        mails = s.scalar(select(func.count()).select_from(OutboxMessage).where(
            col(OutboxMessage.kind) == "escalated"))
    return int(rows or 0), int(mails or 0)


def test_a_return_is_escalated_once_whatever_fires(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    rma = received(p, "IS-1001")
    assert p.escalate_return(rma, "returns.overdue", None, LATER) is True
    assert p.escalate_return(rma, "returns.overdue", None, LATER) is False
    assert p.escalate_return(rma, "prefect.flow-run.Failed", "run-2", LATER) is False
    assert counts(p) == (1, 1)
    with unit_of_work(p.engine) as s:
        mail = s.scalars(select(OutboxMessage).where(col(OutboxMessage.kind) == "escalated")).one()
        assert mail.recipient == p.settings.care_address
        assert mail.context["rma"] == rma and mail.context["state"] == "received"
        assert mail.context["deadline"] and mail.context["lines"]
        assert "customer_name" not in mail.context  # Customer Care gets ids and case facts


@pytest.mark.parametrize(("rma", "cause", "error"), [
    ("RMA-NOPE", "returns.overdue", InvalidInput), (new_rma(b"\x01" * 8), "returns.overdue", NotFound),
    (None, "returns.due_soon", InvalidInput)])
def test_bad_input_changes_nothing(sample_pipeline: Pipeline, rma: str | None, cause: str,
                                   error: type[Exception]) -> None:
    p = sample_pipeline
    target = rma or ask(p, "IS-1001")
    with pytest.raises(error):
        p.escalate_return(target, cause, None, LATER)
    assert counts(p) == (0, 0)


def test_the_board_lists_what_waits_for_a_person_with_links(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    in_review = ask(p, "IS-1006")
    overdue = received(p, "IS-1001")
    expiring = ask(p, "IS-1002")
    p.escalate_return(overdue, "returns.overdue", None, LATER + timedelta(days=11))
    board = p.board(LATER + timedelta(days=11))
    (row,) = board.in_review
    assert (row.rma, row.since) == (in_review, NOW) and row.why and row.deadline is None
    assert board.overdue == [overdue] and board.deadlines[overdue] == LATER + timedelta(days=10)
    assert [r.rma for r in board.escalated] == [overdue] and board.escalated[0].why.startswith("returns.overdue")
    text = board_markdown(board, p.policy)
    assert f"[{overdue}](" in text and f"/artifacts/key/return-{overdue.lower()})" in text
    # why, on its row, cut to one line
    assert any(f"[{in_review}](" in ln and row.why[:40] in ln and len(ln) < 400 for ln in text.splitlines())

    valid_until = p.show(expiring, NOW)["rma_valid_until"]
    lapse = datetime.fromisoformat(valid_until)
    assert expiring not in [r.rma for r in p.board(lapse - EXPIRY_WARNING - timedelta(minutes=1)).expiring]
    assert expiring in [r.rma for r in p.board(lapse - EXPIRY_WARNING).expiring]
    assert expiring in sweep(p, lapse).expired
    assert expiring in [r.rma for r in p.board(lapse + EXPIRED_SHOWN - timedelta(minutes=1)).expired]
    assert expiring not in [r.rma for r in p.board(lapse + EXPIRED_SHOWN + timedelta(minutes=1)).expired]
    assert "## RMAs about to expire" in text and "## Expired in the last 7 days" in text
