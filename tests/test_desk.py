"""The desk flows under Prefect's engine: the what-if replays the known history (tests/desk_history.py) and writes
nothing; the report's numbers match the history worked out by hand; both leave their artifacts, ids only."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import adapters.config
import tasks.returns as tr
from adapters.db import engine_for, upgrade
from flows import desk
from models.whatif import Period, PolicyChangesIn
from service.steps import Pipeline
from service.whatif import what_if
from tests import desk_history
from tests.helpers import LATER, row_counts
from tests.test_flows import artifact

pytestmark = pytest.mark.prefect

WHOLE = {"since": date(2026, 11, 20), "until": date(2026, 11, 20)}  # the day every request of the history was made


@pytest.fixture
def history(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pipeline]:
    """The pipeline the tasks use, on a fresh SQLite database holding the known history."""
    request.getfixturevalue("prefect_harness")
    url = f"sqlite:///{tmp_path / 'returns.db'}"
    monkeypatch.setenv("RETURNS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RETURNS_DATABASE_URL", url)
    adapters.config.settings.cache_clear()
    tr.pipeline.cache_clear()
    upgrade(url)
    p = tr.pipeline()
    desk_history.build(p)
    yield p
    adapters.config.settings.cache_clear()
    tr.pipeline.cache_clear()
    engine_for(url).dispose()


def run(flow: Any, **params: Any) -> Any:
    return flow(**params, return_state=True)


def test_the_current_policy_replayed_over_history_changes_nothing(history: Pipeline) -> None:
    before = row_counts(history)
    state = run(desk.policy_what_if, policy=PolicyChangesIn(), **WHOLE)
    assert state.is_completed(), state.message
    out = state.result()
    assert (out["replayed"], out["changed"], out["returns"], out["policy"]) == (5, 0, [], {})
    assert row_counts(history) == before
    assert "outcomes that change: **0**" in artifact(tr_key("summary")).data
    # Each request is re-decided at its own date, not the day of the replay: a replay months later agrees too.
    later = what_if(history.engine, history.policy, PolicyChangesIn(), Period(), LATER + timedelta(days=90))
    assert (later.replayed, later.returns) == (5, ())


def tr_key(which: str) -> str:
    from tasks.desk import WHAT_IF_SUMMARY, WHAT_IF_TABLE

    return WHAT_IF_SUMMARY if which == "summary" else WHAT_IF_TABLE


def test_a_longer_full_refund_window_changes_the_late_returns_with_the_right_money(history: Pipeline) -> None:
    before = row_counts(history)
    state = run(desk.policy_what_if, policy={"full_refund_days": 90}, **WHOLE)
    assert state.is_completed(), state.message
    out = state.result()
    assert out["policy"] == {"full_refund_days": {"from": "30", "to": "90"}}
    # IS-1002 (80 days) and IS-1008 (49 days) fall inside 90 days: P3 instead of P4, so no fee and R2 no longer
    # bars OR-GEL-POL (38.00 + 2.66 tax). IS-1001 (15 days) and the declined P1/P2 requests do not change.
    by_order = {r["order_number"]: r for r in out["returns"]}
    assert set(by_order) == {"IS-1002", "IS-1008"} and out["changed"] == 2
    assert (by_order["IS-1002"]["refund_before"], by_order["IS-1002"]["refund_after"]) == ("80.04", "139.10")
    assert (by_order["IS-1002"]["fee_before"], by_order["IS-1002"]["fee_after"]) == ("18.40", "0.00")
    # IS-1008's decision changes too, but its RMA expired under both policies (R8): nothing paid either way.
    assert by_order["IS-1008"]["changes"] == ["VC-SERUM-30: authorized P4 -> authorized P3"]
    assert (by_order["IS-1008"]["refund_before"], by_order["IS-1008"]["refund_after"]) == ("0.00", "0.00")
    assert sorted(by_order["IS-1002"]["changes"]) == ["OR-GEL-POL: declined P4 -> authorized P3",
                                                     "PV-SPF50-91: authorized P4 -> authorized P3"]
    assert out["by_change"] == {"authorized P4 -> authorized P3": 2, "declined P4 -> authorized P3": 1}
    assert out["money"] == {"refunds": {"before": "80.04", "after": "139.10", "moves": "59.06"},
                            "restocking_fees": {"before": "18.40", "after": "0.00", "moves": "-18.40"}}
    assert row_counts(history) == before
    table = artifact(tr_key("table"))
    assert "IS-1002" in table.data and "@" not in table.data
    assert "`full_refund_days` 30 -> 90" in artifact(tr_key("summary")).data


def test_a_shorter_rma_validity_and_deadline_show_as_r8_and_p8_changes(history: Pipeline) -> None:
    out = what_if(history.engine, history.policy, PolicyChangesIn(rma_valid_days=1, processing_days=3),
                  Period(**WHOLE), LATER).to_json()
    by_order = {r["order_number"]: r["changes"] for r in out["returns"]}
    # Both parcels came two days after issue (past a 1-day validity); IS-1001 took 2 days (on time under 3),
    # IS-1002 took 12 (late under 10 already). IS-1008 lapsed under both.
    assert by_order == {"IS-1001": ["R8: RMA valid -> lapsed"], "IS-1002": ["R8: RMA valid -> lapsed"]}
    out = what_if(history.engine, history.policy, PolicyChangesIn(processing_days=1), Period(**WHOLE),
                  LATER).to_json()
    assert {r["order_number"]: r["changes"] for r in out["returns"]} == {"IS-1001": ["P8: processed on time -> late"]}
    assert out["money"]["refunds"]["moves"] == "0.00"


def test_an_unknown_field_is_refused_and_the_run_writes_nothing(history: Pipeline) -> None:
    before = row_counts(history)
    state = run(desk.policy_what_if, policy={"full_refund_days": 45, "refund_everything": True})
    assert state.is_failed()
    assert "refund_everything" in (state.message or "") and "Traceback" not in (state.message or "")
    assert row_counts(history) == before


def test_the_report_matches_the_known_history(history: Pipeline) -> None:
    state = run(desk.returns_report, since=date(2026, 8, 1), until=date(2026, 12, 31))
    assert state.is_completed(), state.message
    out = state.result()
    counts = {k: out[k] for k in ("requested", "authorized", "declined", "review", "completed", "expired")}
    assert counts == {"requested": 5, "authorized": 3, "declined": 2, "review": 0, "completed": 2, "expired": 1}
    assert out["declined_lines_per_clause"] == {"P1": 1, "P2": 3, "P4 R2": 1}
    assert out["reasons"] == {"unwanted": 5}
    assert (Decimal(out["refunds_paid"]), Decimal(out["restocking_fees"])) == (desk_history.PAID_REFUNDS,
                                                                              desk_history.PAID_FEES)
    assert out["receipt_to_processed"] == {"returns": 2, "p50_days": 2.0, "p90_days": 12.0, "max_days": 12.0,
                                           "within_deadline": 1, "share_within_deadline": 0.5}
    rates = {r["sku"]: (r["sold"], r["returned"]) for r in out["return_rate_per_sku"]}
    # VC-SERUM-30: 2 sold on IS-1001 and 1 on IS-1008; only IS-1001's unit is still on a return (IS-1008 expired).
    assert rates["VC-SERUM-30"] == (3, 1) and rates["PV-SPF50-91"] == (2, 2) and rates["OR-GEL-POL"] == (2, 0)
    assert len(out["expired_rmas"]) == 1
    page = artifact("returns-report").data
    assert "![charts](data:image/png;base64,iVBORw0KGgo" in page  # the PNG signature, inline
    assert "| requested | 5 |" in page and "within the 10 days (P8): **50%**" in page
    assert "@" not in page.split("![charts]")[0] + page.split(")", 1)[-1]


def test_the_report_of_a_day_counts_only_what_happened_that_day(history: Pipeline) -> None:
    out = run(desk.returns_report, since=date(2026, 11, 20), until=date(2026, 11, 20)).result()
    assert (out["requested"], out["completed"], out["expired"], out["refunds_paid"]) == (5, 0, 0, "0.00")
    assert out["return_rate_per_sku"] == []  # no order was placed that day


def test_a_stricter_expiry_rule_declines_late_returns_and_an_expired_rma_moves_no_money(history: Pipeline) -> None:
    out = what_if(history.engine, history.policy, PolicyChangesIn(late_return_min_shelf_life_years=5),
                  Period(**WHOLE), LATER).to_json()
    by_order = {r["order_number"]: r for r in out["returns"]}
    # P4 needs five years of shelf life: IS-1002's PV-SPF50-91 (2028-06-30) and IS-1008's serum (2028-09-30) fail.
    assert {o: r["changes"][0] for o, r in by_order.items()} == {"IS-1002": "decision authorized -> declined",
                                                                "IS-1008": "decision authorized -> declined"}
    assert (by_order["IS-1002"]["refund_before"], by_order["IS-1002"]["refund_after"]) == ("80.04", "0.00")
    assert (by_order["IS-1008"]["refund_before"], by_order["IS-1008"]["refund_after"]) == ("0.00", "0.00")  # R8
    assert out["money"]["refunds"]["moves"] == "-80.04" and out["money"]["restocking_fees"]["moves"] == "-18.40"
