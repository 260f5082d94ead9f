"""The units of work on real databases (SQLite and PostgreSQL via `sample_pipeline`): the sample orders decided at
2026-11-20T10:00-05:00, R11/R13 across requests, receipt, exactly-once refunds, the outbox, sweeps and reviews.

Label rendering and the mail relay are other people's modules: nothing here calls them (the sweep's label pass is
stubbed out per test).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from adapters.db import unit_of_work
from models.errors import InvalidInput, NotFound, StaleState
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, parse
from models.states import State
from models.tables import (
    GatewaySettlement,
    OrderLine,
    OutboxMessage,
    Payment,
    Refund,
    RefundAllocation,
    Return,
    ReturnLine,
    Transition,
)
from service import stages
from service.results import Decided, Moved, Payout
from service.returns import SAME_ANSWER_FOR_R13, Actor
from service.stages import LocalSteps
from service.steps import Pipeline
from tests.helpers import API, LATER, NOW, cancel, finish, process, receive, review, row_counts, sweep

SAMPLE = Path(__file__).resolve().parent.parent / "sample"
SAMPLES: list[dict[str, Any]] = json.loads((SAMPLE / "requests.json").read_text(encoding="utf-8"))
BY_ORDER = {s["request"]["order_number"]: s["request"] for s in SAMPLES}


# ---- helpers ---------------------------------------------------------------------------------------------------


def req(order: str, **changes: Any) -> ReturnRequestIn:
    return parse(ReturnRequestIn, BY_ORDER[order] | changes)


def ask(p: Pipeline, order: str, now: datetime = NOW, **changes: Any) -> Decided:
    return p.request(req(order, **changes), now, API)


def receipt(rma: str, lines: list[dict[str, Any]], at: datetime = LATER) -> ReceiptIn:
    return parse(ReceiptIn, {"rma": rma, "received_at": at.isoformat(), "lines": lines, "by": "dock"})


def ret_row(p: Pipeline, rma: str) -> Return:
    with unit_of_work(p.engine) as s:
        r = s.scalars(select(Return).where(Return.rma == rma)).one()
        s.expunge(r)
        return r


def transitions(p: Pipeline, return_id: int) -> list[tuple[str | None, str, str]]:
    with unit_of_work(p.engine) as s:
        return [(t.from_state, t.to_state, t.actor) for t in
                s.scalars(select(Transition).where(Transition.return_id == return_id).order_by(Transition.id))]


def outbox(p: Pipeline, return_id: int | None = None) -> list[tuple[int | None, str, str]]:
    with unit_of_work(p.engine) as s:
        stmt = select(OutboxMessage).order_by(OutboxMessage.id)
        if return_id is not None:
            stmt = stmt.where(OutboxMessage.return_id == return_id)
        return [(m.return_id, m.kind, m.recipient) for m in s.scalars(stmt)]


def payments(p: Pipeline, order: str) -> list[tuple[str, int, int]]:
    with unit_of_work(p.engine) as s:
        return [(x.method, x.amount_cents, x.refunded_cents) for x in
                s.scalars(select(Payment).where(Payment.order_number == order).order_by(Payment.seq))]


def skip_label_pass(p: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's label pass belongs to adapters/label (tested elsewhere): report none missing."""
    monkeypatch.setattr(p, "missing_labels", lambda: [])


def assert_audit_consistent(p: Pipeline) -> None:
    """Every return's state is the last audited state, and every audit row chains from the previous one."""
    with unit_of_work(p.engine) as s:
        for r in s.scalars(select(Return)):
            rows = list(s.scalars(select(Transition).where(Transition.return_id == r.id).order_by(Transition.id)))
            assert rows and rows[0].from_state is None and rows[0].to_state == "requested"
            for prev, nxt in zip(rows, rows[1:], strict=False):
                assert nxt.from_state == prev.to_state
            assert rows[-1].to_state == r.state
        keys = [(m.return_id, m.kind) for m in s.scalars(select(OutboxMessage))]
        assert len(keys) == len(set(keys)), "one outbox row per (return, kind)"


def full_receipt(p: Pipeline, rma: str, condition: str = "unopened") -> list[dict[str, Any]]:
    shown = p.show(rma, LATER)
    return [{"sku": ln["sku"], condition: ln["quantity"]} for ln in shown["lines"] if ln["decision"] != "declined"]


# ---- the sample ------------------------------------------------------------------------------------------------


def test_every_sample_request_gets_its_expected_decision(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    expected_mail = {"authorized": "rma_issued", "declined": "declined", "review": "review_needed"}
    for sample in SAMPLES:
        out = p.request(parse(ReturnRequestIn, sample["request"]), NOW, API)
        label, expect = sample["label"], sample["expect"]
        assert out.outcome == expect, label
        assert out.state == expect, label
        assert out.decision["policy_version"] == "image-skincare-2026.1"
        assert (out.rma_number is not None) == (expect != "declined"), label
        assert "R14" in list(out.clauses)
        assert transitions(p, out.return_id) == [(None, "requested", "api"), ("requested", expect, "api")]
        assert [k for _, k, _ in outbox(p, out.return_id)] == [expected_mail[expect]], label
        if expect == "authorized":
            r = ret_row(p, out.rma_number)
            assert r.rma_issued_at == NOW and r.rma_expires_at == NOW + timedelta(days=30)
    with unit_of_work(p.engine) as s:
        by_order = {r.order_number: r for r in s.scalars(select(Return))}
        lines = {(ln.return_id, ln.sku): ln for ln in s.scalars(select(ReturnLine))}
    assert by_order["IS-1001"].refund_total_cents == 7276  # P3: 68.00 + 4.76
    assert by_order["IS-1002"].refund_total_cents == 8004  # P4: 2 x 46.00 + 6.44 - 18.40, gel polisher declined
    assert lines[(by_order["IS-1002"].id, "PV-SPF50-91")].restocking_fee_cents == 1840
    assert lines[(by_order["IS-1002"].id, "OR-GEL-POL")].outcome == "declined"
    assert lines[(by_order["IS-1002"].id, "OR-GEL-POL")].clauses == ["P4", "R2"]
    assert by_order["IS-1003"].decision["lines"][0]["clauses"] == ["P1"]
    assert by_order["IS-1004"].refund_total_cents == 0  # replacement
    assert {ln["clauses"][0] for ln in by_order["IS-1005"].decision["lines"]} == {"P2"}
    assert by_order["IS-1006"].refund_total_cents == 6264  # would-be P4 amount, pending review
    assert by_order["IS-1007"].refund_total_cents == 400  # exchange, 42.00 -> 38.00
    assert by_order["IS-1009"].decision["lines"][0]["clauses"] == ["P5", "R6"]
    assert {tuple(ln["clauses"]) for ln in by_order["IS-1010"].decision["lines"]} == {("P3", "R5")}
    assert_audit_consistent(p)


# ---- R13 ---------------------------------------------------------------------------------------------------


def test_r13_unknown_order_and_wrong_email_answer_alike(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    before = row_counts(p)
    messages = []
    for changes in ({"order_number": "IS-9999"}, {"email": "someone.else@example.com"},
                    {"email": "renat.garipov@example.com"}):  # another customer's real address
        with pytest.raises(NotFound) as exc:
            ask(p, "IS-1001", **changes)
        messages.append(str(exc.value))
        with pytest.raises(NotFound) as exc:
            p.quote(req("IS-1001", **changes), NOW)
        messages.append(str(exc.value))
    assert set(messages) == {SAME_ANSWER_FOR_R13}
    assert row_counts(p) == before
    # the email match is case-insensitive
    assert ask(p, "IS-1001", email="ZOE.LUKASIEWICZ@EXAMPLE.COM", idempotency_key=None).outcome == "authorized"


def test_r13_an_idempotency_key_does_not_reveal_another_customers_return(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    first = ask(p, "IS-1001")  # key storefront-5001
    try:
        stranger = ask(p, "IS-1003", idempotency_key="storefront-5001")
    except (NotFound, InvalidInput):
        return
    assert stranger.rma_number != first.rma_number


# ---- idempotency ---------------------------------------------------------------------------------------------


def test_idempotency_key_replay_returns_the_same_return(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    first = ask(p, "IS-1001")
    before = row_counts(p)
    again = ask(p, "IS-1001")
    assert again.replayed is True and first.replayed is False
    assert (again.return_id, again.rma_number, str(again.refund_total)) == \
        (first.return_id, first.rma_number, str(first.refund_total))
    assert row_counts(p) == before


# ---- R11 across returns ----------------------------------------------------------------------------------------


def test_r11_units_on_open_returns_are_held(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline  # IS-1001 shipped 2 x VC-SERUM-30
    line = {"sku": "VC-SERUM-30", "quantity": 1, "unopened": True}
    assert ask(p, "IS-1001", idempotency_key="a").outcome == "authorized"
    before = row_counts(p)
    with pytest.raises(InvalidInput, match="1 left"):
        ask(p, "IS-1001", idempotency_key="b", lines=[line | {"quantity": 2}])
    assert row_counts(p) == before
    assert ask(p, "IS-1001", idempotency_key="c", lines=[line]).outcome == "authorized"
    with pytest.raises(InvalidInput, match="0 left"):
        ask(p, "IS-1001", idempotency_key="d", lines=[line])
    # the other line of the same order is untouched
    assert ask(p, "IS-1001", idempotency_key="e",
               lines=[{"sku": "CL-FACIAL-CLN", "quantity": 1}]).outcome == "authorized"


def test_r11_a_review_holds_units(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    assert ask(p, "IS-1006").outcome == "review"
    with pytest.raises(InvalidInput, match="R11"):
        ask(p, "IS-1006")


def test_r11_a_declined_return_holds_no_units(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    opened = [{"sku": "VC-SERUM-30", "quantity": 2, "unopened": False}]
    assert ask(p, "IS-1001", idempotency_key="x", lines=opened).outcome == "declined"
    out = ask(p, "IS-1001", idempotency_key="y", lines=[{"sku": "VC-SERUM-30", "quantity": 2}])
    assert out.outcome == "authorized"


def test_cancel_frees_the_units(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    first = ask(p, "IS-1001", idempotency_key="a", lines=[{"sku": "VC-SERUM-30", "quantity": 2}])
    with pytest.raises(InvalidInput, match="R11"):
        ask(p, "IS-1001", idempotency_key="b", lines=[{"sku": "VC-SERUM-30", "quantity": 1}])
    out = cancel(p, first.rma_number, "customer changed their mind", "bob", NOW + timedelta(hours=1))
    assert out.state == "cancelled"
    assert transitions(p, first.return_id)[-1] == ("authorized", "cancelled", "operator:bob")
    assert ask(p, "IS-1001", idempotency_key="c", lines=[{"sku": "VC-SERUM-30", "quantity": 2}]).outcome == \
        "authorized"
    with pytest.raises(InvalidInput, match="cancelled"):
        cancel(p, first.rma_number, "again", "bob", NOW + timedelta(hours=2))
    assert_audit_consistent(p)


# ---- receipt ---------------------------------------------------------------------------------------------------


def test_receipt_with_wrong_counts_is_refused_and_writes_nothing(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out = ask(p, "IS-1002")  # PV-SPF50-91 x 2 authorized, OR-GEL-POL declined
    rma = out.rma_number
    before = row_counts(p)
    trail = transitions(p, out.return_id)
    bad: list[tuple[list[dict[str, Any]], datetime, str]] = [
        ([{"sku": "PV-SPF50-91", "unopened": 1}], LATER, "1 units counted, 2"),
        ([{"sku": "PV-SPF50-91", "unopened": 2, "opened": 1}], LATER, "3 units counted"),
        ([{"sku": "PV-SPF50-91", "unopened": 2}, {"sku": "OR-GEL-POL", "unopened": 1}], LATER, "not on"),
        ([{"sku": "PV-SPF50-91", "unopened": 2}, {"sku": "PV-SPF50-91", "unopened": 2}], LATER, "twice"),
        ([{"sku": "VC-SERUM-30", "unopened": 2}], LATER, "not on"),
        ([{"sku": "PV-SPF50-91", "unopened": 2}], NOW - timedelta(minutes=1), "before the RMA"),
        ([{"sku": "PV-SPF50-91", "unopened": 2}], LATER + timedelta(hours=1), "future"),
    ]
    for lines, at, message in bad:
        with pytest.raises(InvalidInput, match=message):
            receive(p, receipt(rma, lines, at), LATER)
        assert row_counts(p) == before
        assert transitions(p, out.return_id) == trail
        r = ret_row(p, rma)
        assert (r.state, r.received_at, r.deadline_at) == ("authorized", None, None)
    with unit_of_work(p.engine) as s:
        assert all(ln.received_unopened is None for ln in s.scalars(select(ReturnLine)))


def test_receipt_of_a_return_not_awaiting_a_parcel_is_refused(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    review = ask(p, "IS-1006").rma_number  # has a reference number but no issued RMA
    with pytest.raises(InvalidInput, match="not awaiting"):
        receive(p, receipt(review, [{"sku": "AG-RET-SRM", "unopened": 1}]), LATER)
    with pytest.raises(NotFound):
        receive(p, receipt("RMA-0000000", [{"sku": "AG-RET-SRM", "unopened": 1}]), LATER)
    with pytest.raises(InvalidInput, match="check character"):
        receive(p, receipt(review[:-1] + ("0" if review[-1] != "0" else "1"), [{"sku": "AG-RET-SRM",
                                                                                 "unopened": 1}]), LATER)


def test_receipt_starts_the_ten_day_clock(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out = ask(p, "IS-1001")
    received_at = datetime.fromisoformat("2026-11-23T16:45:00-05:00")
    got = receive(p, receipt(out.rma_number, [{"sku": "VC-SERUM-30", "unopened": 1}], received_at), LATER)
    assert got.state == "received"
    r = ret_row(p, out.rma_number)
    assert r.received_at == received_at
    assert r.deadline_at == received_at + timedelta(days=10)
    assert transitions(p, out.return_id)[-1] == ("authorized", "received", "operator:dock")
    assert [k for _, k, _ in outbox(p, out.return_id)] == ["rma_issued", "received"]
    assert p.show(out.rma_number, LATER)["deadline_flag"] == "on_time"


def test_a_receipt_processed_at_once_loads_the_return_once_per_transaction(sample_pipeline: Pipeline) -> None:
    """The receipt stage is three transactions (receipt + claim, plan, completion): the return is read once in each,
    not again after every write."""
    from sqlalchemy import event

    p = sample_pipeline
    out = ask(p, "IS-1002")
    loads: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT returns.id, returns.rma,"):
            loads.append(statement)

    event.listen(p.engine, "before_cursor_execute", count)
    try:
        parcel = receipt(out.rma_number, [{"sku": "PV-SPF50-91", "unopened": 2}])
        done = stages.after_receipt(LocalSteps(p, lambda: LATER), parcel)
    finally:
        event.remove(p.engine, "before_cursor_execute", count)
    assert done.state is State.COMPLETED
    assert len(loads) == 3


# ---- processing: exactly once --------------------------------------------------------------------------------


def test_process_pays_exactly_once(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out = ask(p, "IS-1001")
    rma = out.rma_number
    assert process(p, rma, LATER, API) is None  # not received: nothing to refund yet
    receive(p, receipt(rma, [{"sku": "VC-SERUM-30", "unopened": 1}]), LATER)
    done = process(p, rma, LATER, Actor("worker"))
    assert done is not None and done.state == "completed" and str(done.refund_total) == "72.76"
    before = row_counts(p)
    assert process(p, rma, LATER + timedelta(minutes=1), Actor("worker")) is None
    assert process(p, rma, LATER + timedelta(days=1), Actor("worker")) is None
    assert row_counts(p) == before
    assert payments(p, "IS-1001") == [("visa", 19520, 7276)]
    with unit_of_work(p.engine) as s:
        assert s.execute(select(func.count()).select_from(Refund)).scalar_one() == 1
        assert s.execute(select(func.count()).select_from(GatewaySettlement)).scalar_one() == 1
        assert s.execute(select(func.sum(RefundAllocation.amount_cents))).scalar_one() == 7276
    assert [t[:2] for t in transitions(p, out.return_id)][-3:] == [
        ("authorized", "received"), ("received", "processing"), ("processing", "completed")]
    shown = p.show(rma, LATER)
    assert shown["state"] == "completed" and shown["refund_total"] == "72.76"
    assert shown["payments_refunded"][0]["amount"] == "72.76"
    assert_audit_consistent(p)


def test_r10_refund_goes_to_the_most_recent_payment_first(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out = ask(p, "IS-1002")  # 80.04 over mastercard 73.52 (10:05:00) and paypal 73.53 (10:05:30)
    receive(p, receipt(out.rma_number, [{"sku": "PV-SPF50-91", "unopened": 2}]), LATER)
    done = process(p, out.rma_number, LATER, API)
    assert done is not None and str(done.refund_total) == "80.04"
    assert payments(p, "IS-1002") == [("mastercard", 7352, 651), ("paypal", 7353, 7353)]
    for _, captured, refunded in payments(p, "IS-1002"):
        assert refunded <= captured


def test_r12_opened_and_missing_units_are_not_refunded(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out = ask(p, "IS-1002")
    receive(p, receipt(out.rma_number, [{"sku": "PV-SPF50-91", "unopened": 1, "opened": 1}]), LATER)
    done = process(p, out.rma_number, LATER, API)
    assert done is not None
    assert str(done.refund_total) == "40.02"  # 46.00 + 3.22 - 9.20 for the one unopened unit
    line = p.show(out.rma_number, LATER)["lines"][0]
    assert line["received"] == {"unopened": 1, "opened": 1, "damaged": 0, "missing": 0}
    assert line["settled_refund"] == "40.02"


def test_crash_between_pay_and_complete_pays_once(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out = ask(p, "IS-1002")
    rma = out.rma_number
    receive(p, receipt(rma, [{"sku": "PV-SPF50-91", "unopened": 2}]), LATER)
    assert p.claim(rma, LATER, API) is True
    assert p.claim(rma, LATER + timedelta(minutes=1), API) is False  # the lease is held
    plan = p.plan_refund(rma)
    refs = p.pay(plan).references
    # the worker dies here; a retry re-plans and pays again with the same keys
    plan_again = p.plan_refund(rma)
    assert plan_again.allocations == plan.allocations
    assert p.pay(plan_again).references == refs
    with unit_of_work(p.engine) as s:
        settled = list(s.scalars(select(GatewaySettlement)))
    keys = sorted(f"refund:{rma}:{a.payment_id}" for a in plan.allocations)
    assert sorted(g.idempotency_key for g in settled) == keys
    assert sum(g.amount_cents for g in settled) == 8004
    assert payments(p, "IS-1002") == [("mastercard", 7352, 0), ("paypal", 7353, 0)]  # not recorded yet
    done = p.complete(Payout(plan, refs), LATER, API)
    assert done.state == "completed"
    assert payments(p, "IS-1002") == [("mastercard", 7352, 651), ("paypal", 7353, 7353)]
    with pytest.raises(StaleState):
        p.complete(Payout(plan, refs), LATER, API)
    assert process(p, rma, LATER + timedelta(hours=1), API) is None
    with unit_of_work(p.engine) as s:
        assert s.execute(select(func.count()).select_from(GatewaySettlement)).scalar_one() == len(plan.allocations)
    assert_audit_consistent(p)


def test_a_crashed_claim_is_redriven_after_its_lease(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out = ask(p, "IS-1001")
    rma = out.rma_number
    receive(p, receipt(rma, [{"sku": "VC-SERUM-30", "unopened": 1}]), LATER)
    assert p.claim(rma, LATER, API)
    assert process(p, rma, LATER + timedelta(minutes=14), API) is None
    done = process(p, rma, LATER + timedelta(minutes=16), API)
    assert done is not None and done.state == "completed"
    assert payments(p, "IS-1001") == [("visa", 19520, 7276)]


# ---- the outbox ------------------------------------------------------------------------------------------------


def test_outbox_holds_one_row_per_return_and_kind(sample_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    p = sample_pipeline
    skip_label_pass(p, monkeypatch)
    done = ask(p, "IS-1001")
    declined = ask(p, "IS-1003")
    review = ask(p, "IS-1006")
    lapsing = ask(p, "IS-1008")
    receive(p, receipt(done.rma_number, [{"sku": "VC-SERUM-30", "unopened": 1}]), LATER)
    assert process(p, done.rma_number, LATER, API) is not None
    swept = sweep(p, NOW + timedelta(days=30))
    assert swept.expired == [lapsing.rma_number]
    care = p.settings.care_address
    assert outbox(p, done.return_id) == [(done.return_id, "rma_issued", "zoe.lukasiewicz@example.com"),
                                            (done.return_id, "received", "zoe.lukasiewicz@example.com"),
                                            (done.return_id, "processed", "zoe.lukasiewicz@example.com")]
    assert outbox(p, declined.return_id) == [(declined.return_id, "declined", "ngo.bao.chau@example.com")]
    assert outbox(p, review.return_id) == [(review.return_id, "review_needed", care)]
    assert [k for _, k, _ in outbox(p, lapsing.return_id)] == ["rma_issued", "expired"]
    before = row_counts(p)
    assert sweep(p, NOW + timedelta(days=31)).expired == []
    assert row_counts(p) == before
    assert_audit_consistent(p)


# ---- sweeps (R8, R9) --------------------------------------------------------------------------------------------


def test_r8_sweep_expires_an_rma_after_30_days_and_not_before(
    sample_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = sample_pipeline
    skip_label_pass(p, monkeypatch)
    out = ask(p, "IS-1008")
    rma = out.rma_number
    assert sweep(p, NOW + timedelta(days=30) - timedelta(seconds=1)).expired == []
    assert ret_row(p, rma).state == "authorized"
    assert sweep(p, NOW + timedelta(days=30)).expired == [rma]
    assert ret_row(p, rma).state == "expired"
    assert transitions(p, out.return_id)[-1] == ("authorized", "expired", "sweep")
    assert sweep(p, NOW + timedelta(days=40)).expired == []
    with pytest.raises(InvalidInput):
        receive(p, receipt(rma, [{"sku": "VC-SERUM-30", "unopened": 1}], NOW + timedelta(days=30, hours=1)),
                  NOW + timedelta(days=30, hours=1))
    # the units are free again (R8: a new request may be made)
    assert ask(p, "IS-1008", now=NOW + timedelta(days=30, hours=2)).outcome == "authorized"


def test_r9_due_soon_and_overdue_are_escalated_once_each(
    sample_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = sample_pipeline
    skip_label_pass(p, monkeypatch)
    out = ask(p, "IS-1011")
    rma = out.rma_number
    receive(p, receipt(rma, [{"sku": "AG-RET-SRM", "damaged": 1}, {"sku": "IL-FIRM-MASK", "unopened": 1}]), LATER)
    assert ret_row(p, rma).state == "review"  # waits for an operator; the clock keeps running
    deadline = LATER + timedelta(days=10)
    assert ret_row(p, rma).deadline_at == deadline
    due = deadline - timedelta(hours=48)
    assert sweep(p, due - timedelta(seconds=1)).due_soon == []
    assert sweep(p, due).due_soon == [rma]
    assert sweep(p, due).due_soon == []
    assert sweep(p, due + timedelta(hours=1)).due_soon == []
    assert sweep(p, deadline - timedelta(seconds=1)).overdue == []
    first = sweep(p, deadline)
    assert first.overdue == [rma] and first.due_soon == []
    assert sweep(p, deadline).overdue == []
    assert sweep(p, deadline + timedelta(days=2)).overdue == []
    kinds = Counter(k for _, k, _ in outbox(p, out.return_id))
    assert kinds["due_soon"] == 1 and kinds["overdue"] == 1
    care = p.settings.care_address
    assert {r for _, k, r in outbox(p, out.return_id) if k in {"due_soon", "overdue"}} == {care}
    board = p.board(deadline)
    assert board.overdue == [rma]
    assert p.show(rma, deadline)["deadline_flag"] == "overdue"


def test_sweep_processes_a_received_return_left_behind(
    sample_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = sample_pipeline
    skip_label_pass(p, monkeypatch)
    out = ask(p, "IS-1001")
    receive(p, receipt(out.rma_number, [{"sku": "VC-SERUM-30", "unopened": 1}]), LATER)
    swept = sweep(p, LATER + timedelta(hours=1))
    assert swept.processed == [out.rma_number]
    assert sweep(p, LATER + timedelta(hours=2)).processed == []
    assert payments(p, "IS-1001") == [("visa", 19520, 7276)]


# ---- reviews -----------------------------------------------------------------------------------------------------


def test_review_before_receipt_issues_an_rma(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out = ask(p, "IS-1006")
    rma = out.rma_number
    assert ret_row(p, rma).rma_issued_at is None
    with pytest.raises(InvalidInput):
        cancel(p, rma, "not authorized yet", "alice", NOW)
    at = NOW + timedelta(hours=3)
    assert review(p, rma, True, "lot expires 2028-06", "alice", at) == Moved(rma, State.AUTHORIZED)  # id aside
    r = ret_row(p, rma)
    assert (r.rma_issued_at, r.rma_expires_at) == (at, at + timedelta(days=30))
    assert transitions(p, out.return_id) == [(None, "requested", "api"), ("requested", "review", "api"),
                                                ("review", "authorized", "operator:alice")]
    assert [k for _, k, _ in outbox(p, out.return_id)] == ["review_needed", "rma_issued"]
    assert [ln["decision"] for ln in p.show(rma, at)["lines"]] == ["authorized"]
    with pytest.raises(InvalidInput, match="not in review"):
        review(p, rma, True, "twice", "alice", at)
    receive(p, receipt(rma, [{"sku": "AG-RET-SRM", "unopened": 1}]), LATER)
    done = process(p, rma, LATER, API)
    assert done is not None and str(done.refund_total) == "62.64"  # 72.00 + 5.04 - 14.40 (P4)
    assert payments(p, "IS-1006") == [("afterpay", 8499, 6264)]
    assert_audit_consistent(p)


def test_review_declined_before_receipt(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out = ask(p, "IS-1006")
    assert review(p, out.rma_number, False, "lot expired", "alice", NOW).state == "declined"
    assert [k for _, k, _ in outbox(p, out.return_id)] == ["review_needed", "declined"]
    assert ask(p, "IS-1006", idempotency_key="again").outcome == "review"  # units free again


def _damaged_in_transit(p: Pipeline) -> tuple[dict[str, Any], str]:
    out = ask(p, "IS-1011")
    rma = out.rma_number
    receive(p, receipt(rma, [{"sku": "AG-RET-SRM", "damaged": 1}, {"sku": "IL-FIRM-MASK", "unopened": 1}]), LATER)
    assert ret_row(p, rma).state == "review"
    assert transitions(p, out.return_id)[-2:] == [("authorized", "received", "operator:dock"),
                                                     ("received", "review", "operator:dock")]
    assert [k for _, k, _ in outbox(p, out.return_id)] == ["rma_issued", "received", "review_needed"]
    assert process(p, rma, LATER, API) is None  # review holds it
    return out, rma


def test_review_after_receipt_authorize_finishes_with_the_damaged_unit_refunded(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out, rma = _damaged_in_transit(p)
    at = LATER + timedelta(hours=2)
    operator = Actor("operator:alice")
    assert review(p, rma, True, "courier damage, refund", "alice", at).state == "processing"
    assert process(p, rma, at, operator) is None  # the review holds the claim: no second worker takes it
    done = finish(p, rma, at, operator)
    assert done.state == "completed"
    assert str(done.refund_total) == "132.68"  # 72.00 + 5.04 (damaged, approved) + 52.00 + 3.64
    lines = {ln["sku"]: ln for ln in p.show(rma, at)["lines"]}
    assert lines["AG-RET-SRM"]["settled_refund"] == "77.04"
    assert lines["IL-FIRM-MASK"]["settled_refund"] == "55.64"
    assert payments(p, "IS-1011") == [("apple_pay", 14063, 13268)]
    assert [t for t in transitions(p, out.return_id) if t[2] == "operator:alice"] == [
        ("review", "processing", "operator:alice"), ("processing", "completed", "operator:alice")]
    assert process(p, rma, at + timedelta(hours=1), operator) is None
    assert [k for _, k, _ in outbox(p, out.return_id)][-1] == "processed"
    assert_audit_consistent(p)


def test_review_after_receipt_whose_finish_crashed_is_finished_by_the_sweep(
    sample_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = sample_pipeline
    skip_label_pass(p, monkeypatch)
    _, rma = _damaged_in_transit(p)
    at = LATER + timedelta(hours=2)
    review(p, rma, True, "courier damage, refund", "alice", at)
    p.pay(p.plan_refund(rma))  # the operator's run dies after paying, before recording it
    assert sweep(p, at + timedelta(minutes=14)).processed == []  # lease still held
    assert sweep(p, at + timedelta(minutes=16)).processed == [rma]
    assert ret_row(p, rma).state == "completed"
    assert payments(p, "IS-1011") == [("apple_pay", 14063, 13268)]
    with unit_of_work(p.engine) as s:
        assert s.execute(select(func.sum(GatewaySettlement.amount_cents))).scalar_one() == 13268
    assert_audit_consistent(p)


def test_review_after_receipt_declined(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out, rma = _damaged_in_transit(p)
    assert review(p, rma, False, "customer damage", "alice", LATER).state == "declined"
    assert payments(p, "IS-1011") == [("apple_pay", 14063, 0)]
    assert outbox(p, out.return_id)[-1][1] == "declined"


# ---- bad input changes nothing --------------------------------------------------------------------------------


def test_bad_requests_change_nothing(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    ask(p, "IS-1001")  # something in every table worth protecting
    before = row_counts(p)
    bad: list[tuple[str, dict[str, Any], type[Exception]]] = [
        ("IS-1001", {"lines": [{"sku": "NO-SUCH-SKU", "quantity": 1}], "idempotency_key": "k1"}, InvalidInput),
        ("IS-1001", {"lines": [{"sku": "OR-GEL-POL", "quantity": 1}], "idempotency_key": "k2"}, InvalidInput),
        ("IS-1001", {"lines": [{"sku": "VC-SERUM-30", "quantity": 2}], "idempotency_key": "k3"}, InvalidInput),
        ("IS-1001", {"resolution": "replacement", "idempotency_key": "k4"}, InvalidInput),
        ("IS-1007", {"lines": [{"sku": "PV-SPF32-91", "quantity": 1, "exchange_sku": "NOPE"}]}, InvalidInput),
        ("IS-1001", {"lines": [{"sku": "VC-SERUM-30", "quantity": 1}, {"sku": "VC-SERUM-30", "quantity": 1}],
                     "idempotency_key": "k5"}, InvalidInput),
        ("IS-1001", {"order_number": "IS-0000", "idempotency_key": "k6"}, NotFound),
    ]
    for order, changes, error in bad:
        with pytest.raises(error):
            ask(p, order, **changes)
        assert row_counts(p) == before
    for payload in ({"order_number": "IS-1001"},
                    BY_ORDER["IS-1001"] | {"lines": [{"sku": "VC-SERUM-30", "quantity": 0}]},
                    BY_ORDER["IS-1001"] | {"lines": [{"sku": "VC-SERUM-30", "quantity": "1"}]},
                    BY_ORDER["IS-1001"] | {"surprise": True}):
        with pytest.raises(ValidationError):
            parse(ReturnRequestIn, payload)


def test_bad_imports_change_nothing(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    before = row_counts(p)
    catalog = json.loads((SAMPLE / "catalog.json").read_text(encoding="utf-8"))
    new_product = {"sku": "NEW-1", "name": "New", "kind": "skincare", "size": "retail", "price": "1.00"}
    new_customer = {"account": "ACC-NEW", "name": "New", "email": "new@example.com",
                    "address": {"line1": "1 A St", "city": "X", "postal_code": "1", "country": "US"}}
    order = {"number": "IS-NEW", "account": "ACC-NEW", "channel": "direct", "placed_at": "2026-11-01T10:00:00-05:00",
             "lines": [{"sku": "NEW-1", "quantity": 1, "unit_price": "1.00", "unit_tax": "0.07"}],
             "payments": [{"method": "visa", "amount": "1.07", "captured_at": "2026-11-01T10:00:00-05:00"}]}
    bad_imports = [
        {"products": [new_product], "customers": [new_customer],
         "orders": [order | {"lines": [{"sku": "GHOST", "quantity": 1, "unit_price": "1.00", "unit_tax": "0.00"}]}]},
        {"products": [new_product], "orders": [order]},  # unknown account
        {"products": [new_product], "customers": [new_customer],
         "orders": [order, order | {"number": "IS-NEW2", "lines": order["lines"] * 2}]},  # sku twice on one order
        {"customers": [new_customer], "orders": [catalog["orders"][0] | {"account": "ACC-NEW"}]},  # someone's order
    ]
    for data in bad_imports:
        with pytest.raises(InvalidInput):
            p.import_data(parse(ImportIn, data))
        assert row_counts(p) == before
    good = p.import_data(parse(ImportIn, {"products": [new_product], "customers": [new_customer], "orders": [order]}))
    assert good.orders_added == 1
    assert row_counts(p)["orders"] == before["orders"] + 1


def test_import_is_idempotent(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    before = row_counts(p)
    again = p.import_data(parse(ImportIn, (SAMPLE / "catalog.json").read_text(encoding="utf-8")))
    assert again.orders_added == 0 and again.orders_updated == 0
    assert row_counts(p) == before
    with unit_of_work(p.engine) as s:
        lines = s.execute(select(func.count()).select_from(OrderLine)).scalar_one()
    catalog = json.loads((SAMPLE / "catalog.json").read_text(encoding="utf-8"))
    assert lines == sum(len(o["lines"]) for o in catalog["orders"])


def test_replacement_and_exchange_settle_at_processing(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    replacement = ask(p, "IS-1004")  # P5, opened item, replacement: nothing to pay back
    receive(p, receipt(replacement.rma_number, [{"sku": "IL-FIRM-MASK", "opened": 1}]), LATER)
    done = process(p, replacement.rma_number, LATER, API)
    assert done is not None and str(done.refund_total) == "0.00" and done.allocations == ()
    assert payments(p, "IS-1004") == [("discover", 10853, 0)]
    assert p.show(replacement.rma_number, LATER)["lines"][0]["replacement_units"] == 1
    exchange = ask(p, "IS-1007")  # P6: 42.00 item back, the 38.00 one ships, 4.00 back to the card
    receive(p, receipt(exchange.rma_number, [{"sku": "PV-SPF32-91", "unopened": 1}]), LATER)
    done = process(p, exchange.rma_number, LATER, API)
    assert done is not None and str(done.refund_total) == "4.00"
    assert payments(p, "IS-1007") == [("visa", 5289, 400)]
    with unit_of_work(p.engine) as s:
        assert s.execute(select(func.count()).select_from(GatewaySettlement)).scalar_one() == 1
    assert_audit_consistent(p)


def test_r11_a_completed_return_keeps_holding_its_units(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out = ask(p, "IS-1001")
    receive(p, receipt(out.rma_number, [{"sku": "VC-SERUM-30", "unopened": 1}]), LATER)
    assert process(p, out.rma_number, LATER, API) is not None
    with pytest.raises(InvalidInput, match="1 left"):
        ask(p, "IS-1001", now=LATER, idempotency_key="again", lines=[{"sku": "VC-SERUM-30", "quantity": 2}])


def test_a_second_review_at_receipt_still_tells_customer_care(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    out = ask(p, "IS-1006")
    rma = out.rma_number
    review(p, rma, True, "expiry checked", "alice", NOW)
    receive(p, receipt(rma, [{"sku": "AG-RET-SRM", "damaged": 1}]), LATER)
    assert ret_row(p, rma).state == "review"
    with unit_of_work(p.engine) as s:
        reasons = [r for m in s.scalars(select(OutboxMessage).where(OutboxMessage.return_id == out.return_id,
                                                                    OutboxMessage.kind == "review_needed"))
                   for r in m.context.get("reasons", [])]  # type: ignore[union-attr]
    assert any("damaged" in r for r in reasons), reasons


def test_the_same_receipt_recorded_twice_replays_and_a_different_one_is_refused(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    rma = ask(p, "IS-1001").rma_number
    parcel = receipt(rma, [{"sku": "VC-SERUM-30", "unopened": 1}])
    first = receive(p, parcel, LATER, claim=True)
    assert first.state == "processing"
    before = row_counts(p)
    assert receive(p, parcel, LATER, claim=True).state == "processing"  # a retried task: nothing twice
    assert row_counts(p) == before
    with pytest.raises(InvalidInput, match="not awaiting a parcel"):
        receive(p, receipt(rma, [{"sku": "VC-SERUM-30", "opened": 1}]), LATER)
    assert row_counts(p) == before
