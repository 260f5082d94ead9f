# ruff: noqa: F811  (the `shop` fixture is imported from test_flows and taken by name)
"""The dock under Prefect's engine: a parcel in one scan (its RMA), exceptions per SKU, the refusals that change
nothing, the dock session over many parcels, and settle-review's fixed decision and reason lists."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flows import returns as f
from models.rma import new_rma
from service.steps import Pipeline
from tests.helpers import row_counts
from tests.test_flows import request, run, shop  # noqa: F401  (the shop fixture)

pytestmark = pytest.mark.prefect


def rma_of(order: str) -> str:
    out = run(f.request_return, **request(order))[0].result()
    assert out["state"] == "authorized", out
    return str(out["rma_number"])


def received(p: Pipeline, rma: str) -> dict[str, tuple[int, int, int, int]]:
    """sku -> (unopened, opened, damaged, missing) as recorded."""
    return {ln["sku"]: tuple(ln["received"][k] for k in ("unopened", "opened", "damaged", "missing"))
            for ln in p.show(rma, datetime.now(UTC))["lines"] if ln["received"] is not None}


def mistype(rma: str) -> str:
    """The same RMA with its check character changed."""
    return rma[:-1] + ("0" if rma[-1] != "0" else "1")


# ---- one scan, exceptions --------------------------------------------------------------------------------------


def test_a_scanned_rma_alone_counts_every_unit_unopened_and_completes(shop: Pipeline) -> None:
    rma = rma_of("IS-1002")
    state, _ = run(f.record_receipt, rma=f"  {rma.lower()}\n", by="lantana-dock")  # as a scanner types it
    assert state.is_completed(), state.message
    assert state.result()["state"] == "completed"
    assert received(shop, rma) == {"PV-SPF50-91": (2, 0, 0, 0)}


def test_only_the_exceptions_are_listed_the_rest_of_the_sku_is_unopened(shop: Pipeline) -> None:
    rma = rma_of("IS-1002")
    state, _ = run(f.record_receipt, rma=rma, lines=[{"sku": "PV-SPF50-91", "opened": 1}], by="lantana-dock")
    assert state.is_completed(), state.message
    assert received(shop, rma) == {"PV-SPF50-91": (1, 1, 0, 0)}


def test_all_four_counts_are_still_accepted_when_they_add_up(shop: Pipeline) -> None:
    rma = rma_of("IS-1002")
    state, _ = run(f.record_receipt, rma=rma, lines=[{"sku": "PV-SPF50-91", "unopened": 1, "missing": 1}])
    assert state.is_completed(), state.message
    assert received(shop, rma) == {"PV-SPF50-91": (1, 0, 0, 1)}


# ---- refusals: a clear state message, nothing changes ----------------------------------------------------------


def _received_before(p: Pipeline, rma: str) -> None:
    assert run(f.record_receipt, rma=rma)[0].is_completed()


def _expired(p: Pipeline, rma: str) -> None:
    swept = run(f.deadline_sweep, as_of=datetime.now(UTC) + timedelta(days=31))[0].result()
    assert rma in swept["expired"]


REFUSALS: list[Any] = [
    pytest.param(lambda rma: "", {}, None, "no RMA number", id="no-rma"),
    pytest.param(mistype, {}, None, "check character", id="wrong-check-character"),
    pytest.param(lambda rma: "ACME-0042-77", {}, None, "not one of our RMA numbers", id="other-shop"),
    pytest.param(lambda rma: new_rma(b"\x01\x02\x03\x04\x05\x06"), {}, None, "no return has RMA", id="unknown"),
    pytest.param(lambda rma: rma, {}, _received_before, "was received already, on", id="already-received"),
    pytest.param(lambda rma: rma, {}, _expired, "expired on", id="expired"),
    pytest.param(lambda rma: rma, {"lines": [{"sku": "VC-SERUM-30", "opened": 1}]}, None, "not on",
                 id="sku-not-on-rma"),
    pytest.param(lambda rma: rma, {"lines": [{"sku": "PV-SPF50-91", "opened": 2, "damaged": 1}]}, None,
                 "3 units opened, damaged or missing, 2 on the RMA", id="more-than-on-rma"),
    pytest.param(lambda rma: rma, {"lines": [{"sku": "PV-SPF50-91", "missing": 1},
                                             {"sku": "PV-SPF50-91", "opened": 1}]}, None, "counted twice",
                 id="sku-twice"),
]


@pytest.mark.parametrize(("scanned", "extra", "before_scan", "why"), REFUSALS)
def test_a_parcel_that_cannot_be_received_is_refused_in_one_line_and_changes_nothing(
        shop: Pipeline, scanned: Any, extra: dict[str, Any], before_scan: Any, why: str) -> None:
    rma = rma_of("IS-1002")
    if before_scan:
        before_scan(shop, rma)
    before = row_counts(shop)
    state, _ = run(f.record_receipt, rma=scanned(rma), by="lantana-dock", **extra)
    assert state.is_failed()
    assert why in state.message and "Traceback" not in state.message and "\n" not in state.message, state.message
    assert row_counts(shop) == before


# ---- the dock session -------------------------------------------------------------------------------------------


def test_a_dock_session_records_each_parcel_on_its_own_and_a_bad_one_in_the_middle_stops_nothing(
        shop: Pipeline) -> None:
    first, last = rma_of("IS-1001"), rma_of("IS-1002")
    before_bad = row_counts(shop)
    state, run_id = run(f.dock_session, by="lantana-dock", parcels=[
        {"rma": first}, {"rma": mistype(last)}, {"rma": last, "lines": [{"sku": "PV-SPF50-91", "damaged": 1}]}])
    assert state.is_completed(), state.message
    out = state.result()
    assert (out["received"], out["refused"]) == (2, 1)
    assert [(r["parcel"], r["rma"], r["result"]) for r in out["parcels"]] == [
        (1, first, "received"), (2, mistype(last), "refused"), (3, last, "received")]
    assert "check character" in out["parcels"][1]["why"]
    assert received(shop, last) == {"PV-SPF50-91": (1, 0, 1, 0)}
    assert row_counts(shop)["returns"] == before_bad["returns"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run_id])))
    by_type = {a.type: a for a in artifacts}
    assert by_type["progress"].data == 100.0
    assert "refused" in str(by_type["table"].data) and by_type["table"].key == "dock-session"


# ---- settle-review: fixed lists ------------------------------------------------------------------------------


def in_review(order: str = "IS-1006") -> str:
    out = run(f.request_return, **request(order))[0].result()
    assert out["state"] == "review", out
    return str(out["rma_number"])


def test_settle_review_takes_a_decision_and_a_reason_from_fixed_lists_and_records_both(shop: Pipeline) -> None:
    rma = in_review()
    state, _ = run(f.settle_review, rma=rma, decision="authorize", reason="expiry_checked", by="alice",
                   note="lot 24-117, expires 2028")
    assert state.is_completed(), state.message
    assert state.result()["state"] == "authorized"
    with_note = [t for t in shop.show(rma, datetime.now(UTC))["timeline"] if t["to"] == "authorized"]
    assert with_note and with_note[0]["actor"] == "operator:alice"


@pytest.mark.parametrize(("decision", "reason", "note", "why"), [
    ("approve", "expiry_checked", "", "decision"),
    ("authorize", "lot looks fine", "", "reason"),
    ("authorize", "not_eligible", "", "goes with decline"),
    ("decline", "other", "", "needs a note"),
])
def test_a_decision_or_reason_off_the_lists_is_refused_and_changes_nothing(
        shop: Pipeline, decision: str, reason: str, note: str, why: str) -> None:
    rma = in_review()
    before = row_counts(shop)
    state, _ = run(f.settle_review, rma=rma, decision=decision, reason=reason, by="alice", note=note)
    assert state.is_failed() and why in state.message.lower(), state.message
    assert row_counts(shop) == before
