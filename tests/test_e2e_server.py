"""End to end over plain HTTP against a real `prefect server`, prefect.yaml served by the in-process worker."""

# This test process acts as the storefront and the dock, exactly as they would (tests/served.py).

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from served import REQUESTS, Shop, open_shop, prefect_with_deployments

from adapters.label.layout import label_path

pytestmark = [pytest.mark.slow, pytest.mark.prefect]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    base = tmp_path_factory.mktemp("e2e")
    with prefect_with_deployments(base) as env, open_shop(base / "shop", env) as shop:
        yield shop


def test_a_storefront_request_and_the_dock_receipt_over_http(shop: Shop) -> None:
    storefront = shop.deployment("request-return/storefront")
    assert storefront["enforce_parameter_schema"] is True
    params = REQUESTS["IS-1001"] | {"idempotency_key": "storefront-e2e-1001"}
    created = shop.create("request-return/storefront", params, idempotency_key="http-e2e-1001")
    assert created.status_code == 201, created.text
    run = shop.wait(created.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["name"] == "request-IS-1001"  # the order, not the customer's email

    found = shop.pipeline.lookup("IS-1001", "storefront-e2e-1001")
    assert found is not None
    out = found.to_json()
    assert (out["decision"], out["state"]) == ("authorized", "authorized")
    rma = out["rma_number"]
    pdf = label_path(shop.pipeline.settings.label_dir, rma)
    assert pdf.read_bytes().startswith(b"%PDF")
    assert shop.pipeline.outbox_counts() == {"pending": 0, "sent": 1, "failed": 0}
    (eml,) = shop.mail()
    assert rma in eml.read_text("utf-8")

    key = f"return-{rma.lower()}"
    found = shop.call("POST", "/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}})
    assert found.status_code == 200 and found.json(), found.text
    assert f"# {rma} - authorized" in found.json()[0]["data"]
    assert {"returns.requested", "returns.authorized"} <= shop.events(rma, {"returns.requested", "returns.authorized"})

    dock = shop.deployment("record-receipt/lantana-dock")
    assert dock["enforce_parameter_schema"] is True
    receipt = {"rma": rma, "received_at": datetime.now(UTC).isoformat(), "by": "lantana-dock",
               "lines": [{"sku": "VC-SERUM-30", "unopened": 1, "opened": 0, "damaged": 0, "missing": 0}]}
    created = shop.create("record-receipt/lantana-dock", receipt)
    assert created.status_code == 201, created.text
    run = shop.wait(created.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["name"] == f"receipt-{rma}"
    shown = shop.pipeline.show(rma, datetime.now(UTC))
    assert (shown["state"], shown["refund_total"]) == ("completed", "72.76")
    assert [p["amount"] for p in shown["payments_refunded"]] == ["72.76"]
    assert [(m["kind"], m["status"]) for m in shown["emails"]] == [
        ("rma_issued", "sent"), ("received", "sent"), ("processed", "sent")]
    assert len(shop.mail()) == 3
    latest = shop.call("POST", "/artifacts/latest/filter", json={"artifacts": {"key": {"any_": [key]}}}).json()
    assert f"# {rma} - completed" in latest[0]["data"]
    assert "returns.completed" in shop.events(rma, {"returns.completed"})


@pytest.mark.parametrize(("what", "change"), [
    ("wrong type", {"lines": [{"sku": "VC-SERUM-30", "quantity": "one"}]}),
    ("not one of the reasons", {"reason": "changed my mind"}),
    ("missing field", {"reason": None}),
])
def test_a_malformed_call_is_refused_with_409_and_writes_nothing(shop: Shop, what: str, change: dict[str, Any]) -> None:
    params = {k: v for k, v in (REQUESTS["IS-1004"] | change).items() if v is not None}
    before, runs = shop.rows(), shop.flow_runs("request-return/storefront")
    r = shop.create("request-return/storefront", params)
    assert r.status_code == 409, f"{what}: {r.status_code} {r.text}"
    assert "Validation failed" in r.text or "validation" in r.text.lower(), r.text
    assert shop.flow_runs("request-return/storefront") == runs  # no run was created
    assert shop.rows() == before


def test_an_unknown_extra_key_is_accepted_but_its_run_fails_and_writes_nothing(shop: Shop) -> None:
    before = shop.rows()
    r = shop.create("request-return/storefront", REQUESTS["IS-1004"] | {"coupon": "SPRING"})
    assert r.status_code == 201, r.text  # Prefect's schema check lets unknown keys through (PREFECT-NOTES.md)
    run = shop.wait(r.json()["id"])
    assert run["state"]["type"] == "FAILED", run["state"]
    assert "coupon" in (run["state"]["message"] or ""), run["state"]
    assert shop.rows() == before
    assert shop.returns_of("IS-1004") == []


def test_a_retried_call_with_the_same_idempotency_key_makes_one_run_and_one_return(shop: Shop) -> None:
    params = dict(REQUESTS["IS-1002"])  # the storefront sends no key of its own in the parameters
    params.pop("idempotency_key", None)
    runs = shop.flow_runs("request-return/storefront")
    first = shop.create("request-return/storefront", params, idempotency_key="checkout-7781-return")
    again = shop.create("request-return/storefront", params, idempotency_key="checkout-7781-return")
    assert first.status_code == 201, first.text
    assert again.status_code in (200, 201), again.text
    assert again.json()["id"] == first.json()["id"]
    run = shop.wait(first.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert shop.flow_runs("request-return/storefront") == runs + 1
    (ret,) = shop.returns_of("IS-1002")
    assert ret.state == "authorized" and ret.refund_total_cents == 8004
    assert shop.pipeline.outbox_counts()["pending"] == 0
