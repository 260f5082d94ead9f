"""The shopper's pages over real HTTP, without a browser: the session cookie's flags, CSRF, R13's one answer, failed
look-ups slowed then refused, and a session that sees only its own order. The whole journey in Chromium is
tests/test_shop_browser.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from helpers import free_port

from adapters.clock import utcnow
from entrypoints.api.app import create_app
from entrypoints.api.config import ApiConfig
from entrypoints.api.limits import FailedLookups
from entrypoints.api.serve import api_thread
from entrypoints.demo import shifted_catalog
from models.schemas import ImportIn, parse
from service.steps import Pipeline

OWNER = {"IS-1001": "zoe.lukasiewicz@example.com", "IS-1002": "renat.garipov@example.com"}


@dataclass
class Site:
    url: str
    pipeline: Pipeline

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


@pytest.fixture
def site(pipeline: Pipeline) -> Iterator[Site]:
    pipeline.import_data(parse(ImportIn, shifted_catalog(utcnow())))
    app = create_app(pipeline, config=ApiConfig(secret=b"shop-test-secret"))
    app.state.api.lookups = FailedLookups(slow_after=1, refuse_after=4)
    with api_thread(app, "127.0.0.1", free_port()) as url:
        yield Site(url, pipeline)


def csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


def hidden(page: httpx.Response) -> dict[str, str]:
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))


def look_up(c: httpx.Client, order: str, email: str) -> httpx.Response:
    return c.post("/returns", data={"csrf": csrf(c.get("/returns")), "order_number": order, "email": email})


def return_for(c: httpx.Client, order: str, sku: str) -> str:
    """Log in to `order` and ask for one unit of `sku`: the RMA."""
    assert look_up(c, order, OWNER[order]).status_code == 303
    quote = c.post("/returns/order/quote", data={"csrf": csrf(c.get("/returns/order")), f"qty_{sku}": "1",
                                                  "reason": "unwanted"})
    assert quote.status_code == 200, quote.text
    done = c.post("/returns/order/submit", data=hidden(quote))
    assert done.status_code == 303 and done.headers["location"].startswith("/returns/rma/RMA-"), done.text
    return done.headers["location"].rsplit("/", 1)[1]


def test_the_session_cookie_is_signed_httponly_samesite_and_scoped(site: Site) -> None:
    with site.client() as c:
        r = look_up(c, "IS-1001", OWNER["IS-1001"])
        assert r.status_code == 303 and r.headers["location"] == "/returns/order"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower() and "Path=/returns" in cookie
        assert "Max-Age=1800" in cookie and "@" not in cookie and "IS-1001" not in cookie.split(";")[0]
        assert c.get("/returns/order").status_code == 200
        value = c.cookies["returns_session"]
        c.cookies.set("returns_session", value[:-2] + ("AA" if not value.endswith("AA") else "BB"), path="/returns")
        assert c.get("/returns/order").status_code == 303  # a tampered cookie is no session


def test_csrf_is_refused_without_a_token_or_with_another_sessions(site: Site) -> None:
    with site.client() as c, site.client() as other:
        c.get("/returns")
        no_token = c.post("/returns", data={"order_number": "IS-1001", "email": OWNER["IS-1001"]})
        assert no_token.status_code == 403
        theirs = csrf(other.get("/returns"))
        forged = c.post("/returns", data={"csrf": theirs, "order_number": "IS-1001", "email": OWNER["IS-1001"]})
        assert forged.status_code == 403
        assert look_up(c, "IS-1001", OWNER["IS-1001"]).status_code == 303
        stale = c.post("/returns/order/quote", data={"csrf": theirs, "qty_VC-SERUM-30": "1", "reason": "unwanted"})
        assert stale.status_code == 403


def test_r13_an_unknown_order_and_a_wrong_email_show_the_same_page(site: Site) -> None:
    with site.client() as c:
        unknown = look_up(c, "IS-9999", OWNER["IS-1001"])
    with site.client() as c:
        wrong = look_up(c, "IS-1001", "someone.else@example.com")

    def plain(r: httpx.Response) -> str:
        return re.sub(r'value="[^"]*"', "", r.text)

    assert unknown.status_code == wrong.status_code == 200
    assert plain(unknown) == plain(wrong) and "no order matches" in unknown.text.lower()


def test_failed_look_ups_are_slowed_then_refused_with_429(site: Site) -> None:
    lookups = FailedLookups(slow_after=1, refuse_after=4)
    assert [lookups.failed("a") for _ in range(4)] == [0.0, 0.25, 0.5, 1.0]
    with site.client() as c:
        answers = [look_up(c, "IS-1001", f"guess{i}@example.com") for i in range(5)]
        assert [a.status_code for a in answers] == [200, 200, 200, 200, 429]
        assert int(answers[-1].headers["Retry-After"]) > 0
        assert look_up(c, "IS-1001", OWNER["IS-1001"]).status_code == 429  # even the right answer, for a while


def test_a_session_sees_only_its_own_orders_returns(site: Site) -> None:
    with site.client() as c:
        mine = return_for(c, "IS-1001", "VC-SERUM-30")
        assert c.get(f"/returns/rma/{mine}").status_code == 200
        label = c.get(f"/returns/rma/{mine}/label.pdf")
        assert label.status_code == 200 and label.content.startswith(b"%PDF-")
    with site.client() as c:
        theirs = return_for(c, "IS-1002", "PV-SPF50-91")
        assert c.get(f"/returns/rma/{mine}").status_code == 404
        assert c.get(f"/returns/rma/{mine}/label.pdf").status_code == 404
        assert c.get(f"/returns/rma/{theirs}").status_code == 200
    with site.client() as c:  # no session (the RMA email's link): the look-up, then straight to the return
        first = c.get(f"/returns/rma/{mine}")
        assert first.status_code == 303 and first.headers["location"] == f"/returns?next=/returns/rma/{mine}"
        page = c.get(first.headers["location"])
        done = c.post("/returns", data={"csrf": csrf(page), "order_number": "IS-1001", "email": OWNER["IS-1001"],
                                        "next": hidden(page)["next"]})
        assert done.headers["location"] == f"/returns/rma/{mine}"
        evil = c.post("/returns", data={"csrf": csrf(c.get("/returns")), "order_number": "IS-1001",
                                        "email": OWNER["IS-1001"], "next": "https://evil.example/returns/rma/x"})
        assert evil.headers["location"] == "/returns/order"


def test_the_order_page_says_why_an_item_cannot_be_returned_with_its_clause(site: Site) -> None:
    with site.client() as c:
        look_up(c, "IS-1002", OWNER["IS-1002"])
        page = c.get("/returns/order").text
    item = page[page.index('id="item-OR-GEL-POL"'):]
    item = item[:item.index("</fieldset>")]
    assert "Cannot be returned" in item and "expiration date" in item
    assert '<span class="clause">P4</span>' in item
    assert 'for="qty_OR-GEL-POL"' in item  # every field has its label
