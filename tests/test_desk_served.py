"""The desk deployments on a real `prefect server` (prefect.yaml deployed, the in-process worker): the what-if and
the report run from their deployments, the server's schema check refuses a policy field the form does not have, and
the Prefect UI shows the report's charts (headless Chromium; RETURNS_SCREENSHOTS=<dir> keeps the screenshots)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from served import REQUESTS, Shop, open_shop, prefect_with_deployments

from entrypoints.prefect_api import PrefectApi
from models.schemas import ReceiptIn, ReturnRequestIn, parse
from tests import helpers

pytestmark = [pytest.mark.slow, pytest.mark.prefect]
CHROMIUM = "/usr/bin/chromium"
ORDERS = ("IS-1001", "IS-1002", "IS-1003", "IS-1005", "IS-1008", "IS-1009")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """The sample moved to today, six requests made and IS-1001's parcel processed, served by a real server."""
    base = tmp_path_factory.mktemp("desk-served")
    with prefect_with_deployments(base) as env, open_shop(base / "shop", env) as shop:
        now = datetime.now(UTC)
        rmas = {o: helpers.request(shop.pipeline, parse(ReturnRequestIn, REQUESTS[o]), now=now).rma_number
                for o in ORDERS}
        receipt = parse(ReceiptIn, {"rma": rmas["IS-1001"], "received_at": now.isoformat(), "by": "dock",
                                    "lines": [{"sku": "VC-SERUM-30", "unopened": 1}]})
        helpers.receive(shop.pipeline, receipt, now=now)
        assert helpers.process(shop.pipeline, str(rmas["IS-1001"]), now=now + timedelta(hours=1)) is not None
        yield shop


def artifact_of(shop: Shop, run_id: str, key: str) -> dict[str, Any]:
    r = shop.call("POST", "/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": [key]}}, "limit": 1})
    assert r.status_code == 200 and r.json(), r.text
    return dict(r.json()[0])


def completed(shop: Shop, deployment: str, parameters: dict[str, Any]) -> str:
    r = shop.create(deployment, parameters)
    assert r.status_code == 201, r.text
    run = shop.wait(r.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    return str(run["id"])


def test_the_what_if_deployment_replays_and_writes_nothing(shop: Shop) -> None:
    before = shop.rows()
    run_id = completed(shop, "policy-what-if/on-demand", {"policy": {"full_refund_days": 90}})
    rows = PrefectApi(shop.api.base_url.__str__().rstrip("/")).table_artifact(run_id, "policy-what-if")
    # IS-1002 (80 days, P4) and IS-1008 (49 days, P4) would be full refunds under a 90-day window.
    assert {row["order"] for row in rows} == {"IS-1002", "IS-1008"}
    summary = artifact_of(shop, run_id, "policy-what-if-summary")
    assert "`full_refund_days` 30 -> 90" in summary["data"] and "@" not in summary["data"] + str(rows)
    assert shop.rows() == before


def test_a_policy_field_the_form_does_not_have_is_refused_by_the_server(shop: Shop) -> None:
    before, runs = shop.rows(), shop.flow_runs("policy-what-if/on-demand")
    r = shop.create("policy-what-if/on-demand", {"policy": {"full_refund_days": 45, "refund_everything": True}})
    assert r.status_code == 409, r.text  # the nested form forbids extra keys (additionalProperties: false)
    assert "refund_everything" in r.text
    assert shop.flow_runs("policy-what-if/on-demand") == runs
    assert shop.rows() == before


def test_the_report_deployment_publishes_its_numbers_and_charts(shop: Shop) -> None:
    today = datetime.now(UTC).date()
    run_id = completed(shop, "returns-report/weekly", {"since": (today - timedelta(days=120)).isoformat(),
                                                       "until": (today + timedelta(days=1)).isoformat()})
    page = artifact_of(shop, run_id, "returns-report")["data"]
    assert "| requested | 6 |" in page and "| completed | 1 |" in page
    assert "![charts](data:image/png;base64," in page


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_the_prefect_ui_shows_the_report_charts_and_the_what_if(shop: Shop, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    today = datetime.now(UTC).date()
    report_run = completed(shop, "returns-report/weekly", {"since": (today - timedelta(days=120)).isoformat(),
                                                           "until": (today + timedelta(days=1)).isoformat()})
    what_if_run = completed(shop, "policy-what-if/on-demand", {"policy": {"full_refund_days": 90,
                                                                          "restocking_fee_rate": "0.15"}})
    ui = shop.api.base_url.join("/").__str__().rstrip("/")
    shots = Path(os.environ.get("RETURNS_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2000})  # the UI scrolls inside its own pane
            report = artifact_of(shop, report_run, "returns-report")
            page.goto(f"{ui}/artifacts/artifact/{report['id']}")
            chart = page.locator("img[src^='data:image/png']").first
            chart.wait_for(state="visible", timeout=30_000)
            # The UI's markdown renderer keeps the data: URI and the browser decodes the PNG (not a broken image).
            assert chart.evaluate("img => img.complete && img.naturalWidth") > 300
            page.screenshot(path=str(shots / "ui-report.png"), full_page=True)
            page.set_viewport_size({"width": 1400, "height": 800})
            summary = artifact_of(shop, what_if_run, "policy-what-if-summary")
            page.goto(f"{ui}/artifacts/artifact/{summary['id']}")
            page.get_by_text("outcomes that change").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "ui-what-if.png"), full_page=True)
            table = artifact_of(shop, what_if_run, "policy-what-if")
            page.goto(f"{ui}/artifacts/artifact/{table['id']}")
            page.get_by_text("IS-1002").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "ui-what-if-table.png"), full_page=True)
            # The deployment's run form: one field per policy number, named as on the Policy object.
            deployment = shop.deployment("policy-what-if/on-demand")
            page.goto(f"{ui}/deployments/deployment/{deployment['id']}/run")
            page.get_by_text("Full Refund Days").first.wait_for(timeout=30_000)  # the UI title-cases field names
            page.screenshot(path=str(shots / "ui-what-if-form.png"), full_page=True)
        finally:
            browser.close()
