"""The storefront API over real HTTP (uvicorn on a loopback port), with the request stage run in-process: quotes,
idempotent creation, status, labels, an order's returns, problem+json errors, keys, R13 and the limits, on SQLite and
PostgreSQL. The same API in front of a real Prefect server and worker is tests/test_api_served.py."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SAMPLE
from helpers import free_port, row_counts

from adapters.clock import utcnow
from entrypoints.api.app import create_app
from entrypoints.api.config import ApiConfig
from entrypoints.api.serve import api_thread
from entrypoints.demo import shifted_catalog
from models.rma import new_rma
from models.schemas import ImportIn, parse
from service.steps import Pipeline

REQUESTS: dict[str, dict[str, Any]] = {
    s["request"]["order_number"]: {k: v for k, v in s["request"].items() if k != "idempotency_key"}
    for s in json.loads((SAMPLE / "requests.json").read_text(encoding="utf-8"))
}
PROBLEM = "application/problem+json"


@dataclass
class Storefront:
    """A running API and a storefront's client with a valid key."""

    url: str
    key: str
    http: httpx.Client
    pipeline: Pipeline

    def ask(self, order: str, key: str, **change: Any) -> httpx.Response:
        return self.http.post("/v1/returns", json=REQUESTS[order] | change, headers={"Idempotency-Key": key})


@contextmanager
def serve(pipeline: Pipeline, config: ApiConfig | None = None) -> Iterator[Storefront]:
    """The API over `pipeline` on a free loopback port, a key named `test`, and a client carrying it."""
    key = pipeline.create_api_key("test", utcnow())
    app = create_app(pipeline, config=config or ApiConfig(secret=b"test-secret"))
    with api_thread(app, "127.0.0.1", free_port()) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        yield Storefront(url, key, http, pipeline)


@pytest.fixture
def shop(pipeline: Pipeline) -> Iterator[Storefront]:
    """The sample, its dates moved so that its requests arrive now, behind a running API."""
    pipeline.import_data(parse(ImportIn, shifted_catalog(utcnow())))
    with serve(pipeline) as front:
        yield front


def is_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["status"] == status and body["title"] and body["type"], body
    assert "Traceback" not in r.text
    return dict(body)


# ---- quotes --------------------------------------------------------------------------------------------------


def test_a_quote_gives_each_line_its_decision_clauses_and_reason_and_the_units_left(shop: Storefront) -> None:
    before = row_counts(shop.pipeline)
    r = shop.http.post("/v1/quotes", json=REQUESTS["IS-1002"])
    assert r.status_code == 200, r.text
    q = r.json()
    assert q["decision"] == "authorized"
    assert {ln["sku"]: ln["decision"] for ln in q["lines"]} == {"PV-SPF50-91": "authorized", "OR-GEL-POL": "declined"}
    declined = next(ln for ln in q["lines"] if ln["decision"] == "declined")
    assert declined["clauses"] == ["P4", "R2"] and "expires" in declined["reason"]
    assert {u["sku"]: u["quantity_left"] for u in q["units"]} == {"PV-SPF50-91": 2, "OR-GEL-POL": 1}
    assert row_counts(shop.pipeline) == before  # a quote writes nothing


def test_r13_an_unknown_order_and_a_wrong_email_get_the_same_answer(shop: Storefront) -> None:
    unknown = shop.http.post("/v1/quotes", json=REQUESTS["IS-1001"] | {"order_number": "IS-9999"})
    wrong = shop.http.post("/v1/quotes", json=REQUESTS["IS-1001"] | {"email": "someone.else@example.com"})
    assert is_problem(unknown, 404) == is_problem(wrong, 404)
    for path in ("/v1/returns",):
        a = shop.http.post(path, json=REQUESTS["IS-1001"] | {"order_number": "IS-9999"},
                           headers={"Idempotency-Key": "r13-a"})
        b = shop.http.post(path, json=REQUESTS["IS-1001"] | {"email": "someone.else@example.com"},
                           headers={"Idempotency-Key": "r13-b"})
        assert is_problem(a, 404) == is_problem(b, 404)


@pytest.mark.parametrize(("what", "body"), [
    ("not JSON", b"{"),
    ("unknown field", json.dumps(REQUESTS["IS-1001"] | {"coupon": "X"}).encode()),
    ("wrong type", json.dumps(REQUESTS["IS-1001"] | {"lines": [{"sku": "VC-SERUM-30", "quantity": "1"}]}).encode()),
    ("too many units (R11)", json.dumps(REQUESTS["IS-1001"] | {"lines": [{"sku": "VC-SERUM-30", "quantity": 9}]})
     .encode()),
])
def test_bad_input_is_a_422_problem_naming_the_field_and_writes_nothing(shop: Storefront, what: str,
                                                                         body: bytes) -> None:
    before = row_counts(shop.pipeline)
    for path in ("/v1/quotes", "/v1/returns"):
        r = shop.http.post(path, content=body, headers={"Idempotency-Key": "bad-" + what.split()[0],
                                                        "Content-Type": "application/json"})
        assert is_problem(r, 422)["detail"], what
    assert row_counts(shop.pipeline) == before


# ---- returns ---------------------------------------------------------------------------------------------------


def test_a_request_answers_201_with_the_rma_label_and_status_then_replays_the_same(shop: Storefront) -> None:
    r = shop.ask("IS-1001", "checkout-1")
    assert r.status_code == 201, r.text
    out = r.json()
    rma = out["rma_number"]
    assert (out["decision"], out["state"], out["refund_total"]) == ("authorized", "authorized", "72.76")
    assert out["label_url"] == f"/v1/returns/{rma}/label.pdf" and out["status_url"] == f"/v1/returns/{rma}"
    assert r.headers["Location"] == out["status_url"] and "Idempotent-Replayed" not in r.headers

    label = shop.http.get(out["label_url"])
    assert label.status_code == 200 and label.headers["content-type"] == "application/pdf"
    assert label.content.startswith(b"%PDF-")

    again = shop.ask("IS-1001", "checkout-1")
    assert (again.status_code, again.json(), again.headers["Idempotent-Replayed"]) == (201, out, "true")
    assert len(shop.pipeline.order_returns("IS-1001", utcnow())) == 1

    other = shop.ask("IS-1001", "checkout-1", lines=[{"sku": "VC-SERUM-30", "quantity": 1, "unopened": False}])
    assert is_problem(other, 422)["type"] == "/problems/idempotency-key-reused"

    status = shop.http.get(out["status_url"]).json()
    assert (status["state"], status["rma_number"], status["label_url"]) == ("authorized", rma, out["label_url"])
    assert [t["state"] for t in status["timeline"]] == ["requested", "authorized"]
    assert "Lantana" in status["status_text"]
    listed = shop.http.get("/v1/orders/IS-1001/returns").json()
    assert [x["rma_number"] for x in listed["returns"]] == [rma]


def test_a_declined_request_has_no_rma_nor_label_and_its_status_is_the_request(shop: Storefront) -> None:
    r = shop.ask("IS-1003", "partner-1")
    assert r.status_code == 201, r.text
    out = r.json()
    assert (out["decision"], out["rma_number"], out["label_url"]) == ("declined", None, None)
    assert out["lines"][0]["clauses"] == ["P1"]
    assert shop.http.get(out["status_url"]).json() == out


def test_the_idempotency_key_is_required_and_bounded(shop: Storefront) -> None:
    r = shop.http.post("/v1/returns", json=REQUESTS["IS-1001"])
    assert is_problem(r, 400)["type"] == "/problems/idempotency-key-required"
    r = shop.http.post("/v1/returns", json=REQUESTS["IS-1001"], headers={"Idempotency-Key": "x" * 129})
    is_problem(r, 400)


def test_two_concurrent_calls_with_one_key_make_one_return(shop: Storefront) -> None:
    answers: list[httpx.Response] = []
    start = threading.Barrier(4)

    def call() -> None:
        with httpx.Client(base_url=shop.url, headers={"Authorization": f"Bearer {shop.key}"}, timeout=60) as c:
            start.wait()
            answers.append(c.post("/v1/returns", json=REQUESTS["IS-1001"], headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status_code for a in answers) == [201] * 4, [a.text for a in answers]
    assert len({a.json()["rma_number"] for a in answers}) == 1
    assert len(shop.pipeline.order_returns("IS-1001", utcnow())) == 1


# ---- status and labels --------------------------------------------------------------------------------------------


def test_a_malformed_rma_is_422_and_an_unknown_one_404(shop: Storefront) -> None:
    good = new_rma()
    bad_check = good[:-1] + ("0" if good[-1] != "0" else "1")
    for suffix in ("", "/label.pdf"):
        assert "check character" in is_problem(shop.http.get(f"/v1/returns/{bad_check}{suffix}"), 422)["detail"]
        is_problem(shop.http.get(f"/v1/returns/{good}{suffix}"), 404)
        is_problem(shop.http.get(f"/v1/returns/not-an-rma{suffix}"), 422)
    is_problem(shop.http.get("/v1/orders/IS-9999/returns"), 404)
    is_problem(shop.http.get("/v1/orders/bad%20number/returns"), 422)
    is_problem(shop.http.get("/v1/nothing-here"), 404)


def test_a_return_in_review_has_no_label_yet(shop: Storefront) -> None:
    out = shop.ask("IS-1006", "review-1").json()
    assert (out["decision"], out["label_url"]) == ("review", None)
    is_problem(shop.http.get(f"/v1/returns/{out['rma_number']}/label.pdf"), 404)


# ---- keys and limits ----------------------------------------------------------------------------------------------


def test_no_key_a_wrong_key_and_a_revoked_key_get_401_with_a_challenge(shop: Storefront) -> None:
    anonymous = httpx.post(f"{shop.url}/v1/quotes", json=REQUESTS["IS-1001"])
    assert is_problem(anonymous, 401) and anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = httpx.post(f"{shop.url}/v1/quotes", json=REQUESTS["IS-1001"], headers={"Authorization": "Bearer rk_x"})
    assert is_problem(wrong, 401) and 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    assert shop.http.post("/v1/quotes", json=REQUESTS["IS-1001"]).status_code == 200
    shop.pipeline.revoke_api_key("test", utcnow())
    revoked = shop.http.post("/v1/quotes", json=REQUESTS["IS-1001"])
    assert is_problem(revoked, 401)["detail"] == is_problem(wrong, 401)["detail"]


def test_the_database_keeps_only_a_hash_of_each_key(shop: Storefront) -> None:
    from sqlalchemy import text

    with shop.pipeline.engine.connect() as conn:
        dumped = json.dumps([list(row) for row in conn.execute(text("select * from api_keys"))], default=str)
    assert shop.key not in dumped and shop.key[3:] not in dumped


def test_rates_are_limited_per_key_with_429_and_retry_after(pipeline: Pipeline) -> None:
    pipeline.import_data(parse(ImportIn, shifted_catalog(utcnow())))
    with serve(pipeline, ApiConfig(secret=b"s", key_rate=1.0)) as front:
        codes = [front.http.get("/v1/orders/IS-1001/returns") for _ in range(4)]
        limited = [r for r in codes if r.status_code == 429]
        assert limited, [r.status_code for r in codes]
        assert int(is_problem(limited[0], 429) and limited[0].headers["Retry-After"]) >= 1


def test_rates_are_limited_per_client_address_even_without_a_key(pipeline: Pipeline) -> None:
    with serve(pipeline, ApiConfig(secret=b"s", address_rate=1.0)) as front:
        codes = [httpx.get(f"{front.url}/v1/orders/IS-1001/returns").status_code for _ in range(4)]
        assert 429 in codes and codes[0] == 401, codes


def test_a_body_over_the_cap_is_413_before_anything_reads_it(shop: Storefront) -> None:
    huge = json.dumps(REQUESTS["IS-1001"] | {"pad": "x" * 70_000})
    r = shop.http.post("/v1/quotes", content=huge, headers={"Content-Type": "application/json"})
    is_problem(r, 413)


def test_no_key_reaches_any_log(pipeline: Pipeline, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    pipeline.import_data(parse(ImportIn, shifted_catalog(utcnow())))
    caplog.set_level(logging.DEBUG)
    with serve(pipeline) as front:
        front.ask("IS-1001", "log-1")
        front.http.get("/v1/orders/IS-1001/returns")
        httpx.get(f"{front.url}/v1/orders/IS-1001/returns", headers={"Authorization": "Bearer rk_not-a-key"})
        logged = caplog.text + "".join(p.read_text("utf-8", "replace") for p in tmp_path.rglob("*.log"))
        assert front.key not in logged and "rk_not-a-key" not in logged


def test_the_openapi_document_and_its_pages(shop: Storefront) -> None:
    doc = httpx.get(f"{shop.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/quotes", "/v1/returns", "/v1/returns/{rma}", "/v1/returns/{rma}/label.pdf",
            "/v1/orders/{number}/returns"} <= set(doc["paths"])
    body = doc["paths"]["/v1/returns"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ReturnRequestIn"}
    assert "email" in doc["components"]["schemas"]["ReturnRequestIn"]["required"]
    assert "Idempotency-Key" in {p["name"] for p in doc["paths"]["/v1/returns"]["post"]["parameters"]}
    assert httpx.get(f"{shop.url}/docs").status_code == 200


@pytest.mark.parametrize(("value", "threads"), [("", 8), ("0", 0), ("4", 4)])
def test_the_request_run_threads_come_from_the_environment(tmp_path: Path, value: str, threads: int) -> None:
    env = {"RETURNS_SESSION_SECRET": "s"} | ({"RETURNS_API_RUN_THREADS": value} if value else {})
    assert ApiConfig.from_env(tmp_path, env).run_threads == threads


@pytest.mark.parametrize("value", ["-1", "four", "2.5", "65"])
def test_a_bad_request_run_threads_is_a_clear_error(tmp_path: Path, value: str) -> None:
    from models.errors import InvalidInput

    with pytest.raises(InvalidInput, match="RETURNS_API_RUN_THREADS must be a whole number from 0 to 64"):
        ApiConfig.from_env(tmp_path, {"RETURNS_SESSION_SECRET": "s", "RETURNS_API_RUN_THREADS": value})


def test_a_request_queues_for_a_busy_run_thread_within_its_wait_rather_than_going_to_the_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run thread busy: a call that waits gets the next free one (its run is created claimed, for this
    process); a call that waits for nothing, or finds no thread within its wait, hands its run to the worker."""
    from types import SimpleNamespace

    from entrypoints.api.submit import RunsHere, ThroughPrefect

    here = RunsHere("http://127.0.0.1:9/api", threads=1)
    started: list[str] = []
    monkeypatch.setattr(here, "start", lambda run: started.append(run["id"]))  # holds its thread: no engine here
    made: list[tuple[str, bool]] = []

    class Prefect:
        def new_run(self, deployment: str, parameters: dict[str, Any], idempotency_key: str, *, pending: bool,
                    tags: list[str] | None, checked: bool) -> tuple[dict[str, Any], bool]:
            made.append((idempotency_key, pending))
            return {"id": f"run-{len(made)}", "state": {"type": "PENDING" if pending else "SCHEDULED"}}, True

    class Shop:
        def request_started(self, reference: str, run_id: str) -> None:
            pass

        def decided_request(self, accepted: Any) -> Any:
            return SimpleNamespace(authorized=False, rma_number=None)  # decided at once: the call returns

    submitter = ThroughPrefect(Prefect(), Shop(), here=here)  # type: ignore[arg-type]

    def call(key: str, wait: float) -> None:
        submitter.submit(SimpleNamespace(flow_run_id=None, parameters={}, reference=key), key, wait)  # type: ignore[arg-type]

    assert here.reserve()  # the one thread, busy with an earlier run
    threading.Timer(0.2, here.release).start()  # ... which ends while the next call waits
    call("waits", wait=30)
    call("waits-for-nothing", wait=0)
    call("finds-none-in-its-wait", wait=0.3)
    assert made == [("waits", True), ("waits-for-nothing", False), ("finds-none-in-its-wait", False)]
    assert started == ["run-1"]
    here.close()
