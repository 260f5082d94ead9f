"""The shopper's journey in a real browser (Debian's Chromium, driven by Playwright; no browser download): look up the
order by keyboard alone, see a refused item's reason, pick an item, see the quote, get the RMA, download the label.
Each page is photographed at desktop and phone width (into RETURNS_SCREENSHOTS, e.g. docs/, when set)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port

from adapters.clock import utcnow
from entrypoints.api.app import create_app
from entrypoints.api.config import ApiConfig
from entrypoints.api.serve import api_thread
from entrypoints.demo import shifted_catalog
from models.schemas import ImportIn, parse
from service.steps import Pipeline

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                                 reason="Debian's chromium is not installed (apt-get install chromium)")]
SIZES = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}


@pytest.fixture
def site(tmp_path: Path, sqlite_url: str) -> Iterator[str]:
    from conftest import make_pipeline

    pipeline: Pipeline = make_pipeline(tmp_path / "home", sqlite_url)
    pipeline.import_data(parse(ImportIn, shifted_catalog(utcnow())))
    with api_thread(create_app(pipeline, config=ApiConfig(secret=b"browser-test")), "127.0.0.1", free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        found = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield found
        found.close()


def shots_dir(tmp_path: Path) -> Path:
    return Path(os.environ.get("RETURNS_SCREENSHOTS") or tmp_path)


def tab_to(page: Any, element_id: str, limit: int = 12) -> None:
    """Press Tab until the element has the focus, as a keyboard user would."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
    raise AssertionError(f"#{element_id} cannot be reached with Tab")


@pytest.mark.parametrize("size", sorted(SIZES))
def test_the_whole_journey_from_look_up_to_the_label(site: str, browser: Any, size: str, tmp_path: Path) -> None:
    shots = shots_dir(tmp_path)
    context = browser.new_context(viewport=SIZES[size], accept_downloads=True)
    page = context.new_page()

    def shot(name: str) -> None:
        page.screenshot(path=str(shots / f"shop-{name}-{size}.png"), full_page=True)

    page.goto(f"{site}/returns")
    assert page.title().startswith("Start a return")
    # keyboard only: Tab into each field, type, Enter submits; the focus is visible
    tab_to(page, "order_number")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", "the focused field shows no focus ring"
    page.keyboard.type("IS-1002")
    tab_to(page, "email")
    page.keyboard.type("not.the.owner@example.com")
    page.keyboard.press("Enter")
    page.wait_for_selector("#lookup-error")
    assert "no order matches" in page.inner_text("#lookup-error").lower()
    shot("lookup")

    page.fill("#order_number", "IS-1002")
    page.fill("#email", "renat.garipov@example.com")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{site}/returns/order")
    refused = page.inner_text("#item-OR-GEL-POL")
    assert "Cannot be returned" in refused and "P4" in refused and "expiration date" in refused
    assert page.get_by_label("How many to return (of 2 left)").is_visible()
    shot("order")

    page.select_option("#qty_PV-SPF50-91", "1")
    page.select_option("#reason", "unwanted")
    page.get_by_role("button", name="See what I would get").click()
    page.wait_for_url(f"{site}/returns/order/quote")
    assert "Can be returned" in page.inner_text("main") and "restocking fee" in page.inner_text("main")
    shot("quote")

    page.get_by_role("button", name="Get my RMA and label").click()
    page.wait_for_url(f"{site}/returns/rma/RMA-*")
    rma = page.inner_text("#rma")
    assert rma.startswith("RMA-") and page.url.endswith(rma)
    assert "7130 Seacrest Blvd" in page.inner_text("main") and "10 days" in page.inner_text("main")
    shot("return")

    with page.expect_download() as download:
        page.click("#label")
    saved = tmp_path / "label.pdf"
    download.value.save_as(saved)
    assert saved.read_bytes().startswith(b"%PDF-")
    context.close()
