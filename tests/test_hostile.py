"""Hostile input through the in-process API (`models.schemas.parse` + Pipeline) and the `returns` command: wrong types,
huge numbers, floats and NaN, 10 MB strings, control characters, `../` and NUL in RMA numbers, SQL and HTML, times
without an offset, bad quantities, deeply nested JSON, non-UTF-8 bytes, empty input. Every one earns a clear one-line
error (no traceback, nothing echoed at length) and leaves the database and the files under RETURNS_HOME exactly as
they were. Hypothesis (derandomized) mutates valid requests, imports and receipts into always-invalid ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import make_pipeline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from invariants import check_invariants
from pydantic import ValidationError
from sqlalchemy import select
from sqlmodel import SQLModel

import models.tables  # noqa: F401  (registers every table on the metadata)
from adapters.db import unit_of_work
from models.errors import ReturnsError
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, explain, parse
from service.returns import Actor
from service.steps import Pipeline
from tests.helpers import API, NOW, cancel, process, receive, review, tally

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample"
LATER = NOW + timedelta(days=2)
REQUESTS = {s["request"]["order_number"]: s["request"]
            for s in json.loads((SAMPLE / "requests.json").read_text("utf-8"))}
TEN_MB = "x" * (10 * 1024 * 1024)
SQL = "'; DROP TABLE returns; --"
HTML = "<script>alert('x')</script><img src=x onerror=alert(1)>"
INPUTS = tally("hostile")

settings.register_profile("ci", derandomize=True, database=None, max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
CI = settings.get_profile("ci")


# ---- the world the inputs are thrown at ------------------------------------------------------------------------------


@dataclass
class World:
    p: Pipeline
    home: Path
    authorized: str  # an RMA awaiting its parcel (label on disk)
    received: str  # an RMA received (processing under way or done)

    def snapshot(self) -> tuple[dict[str, list[str]], dict[str, str]]:
        """Every row of every table, and every path under RETURNS_HOME with its bytes' digest."""
        with unit_of_work(self.p.engine) as s:
            rows = {t.name: sorted(repr(tuple(r)) for r in s.execute(select(t)).all())
                    for t in SQLModel.metadata.sorted_tables}
        files = {str(f.relative_to(self.home)): hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir/"
                 for f in sorted(self.home.rglob("*"))}
        return rows, files


def build_world(root: Path, url: str | None = None) -> World:
    """A pipeline whose database lives outside RETURNS_HOME, with the sample imported, one authorized return (label
    rendered), one received and processed, and the emails relayed: files and rows for hostile input to disturb."""
    home = root / "home"
    p = make_pipeline(home, url or f"sqlite:///{root / 'db' / 'returns.db'}")
    p.import_data(parse(ImportIn, (SAMPLE / "catalog.json").read_text("utf-8")))
    a = p.request(parse(ReturnRequestIn, REQUESTS["IS-1001"]), NOW, API)
    b = p.request(parse(ReturnRequestIn, REQUESTS["IS-1004"]), NOW, API)
    for out in (a, b):
        p.render_label(out.rma_number)
    receive(p, parse(ReceiptIn, {"rma": b.rma_number, "received_at": LATER.isoformat(), "by": "dock",
                                "lines": [{"sku": "IL-FIRM-MASK", "damaged": 1}]}), LATER)
    process(p, b.rma_number, LATER, API)
    p.relay(LATER)
    assert list((home / "labels").glob("*.pdf")) and list((home / "mail").glob("*.eml"))
    return World(p, home, a.rma_number, b.rma_number)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("hostile"))


# ---- one attempt ---------------------------------------------------------------------------------------------------


def one_line(message: str) -> str:
    """A clear one-line error: no traceback, no newline, no control character, not the hostile value echoed."""
    assert message and "\n" not in message and "\r" not in message, repr(message[:300])
    assert "Traceback" not in message and len(message) <= 300, repr(message[:300])
    assert all(ch.isprintable() for ch in message), repr(message[:300])
    return message


def run_op(w: World, kind: str, payload: Any) -> str | None:
    """Hand the payload to one entry point; return the one-line error, or None if accepted (imports only: a valid
    empty import is accepted and writes nothing)."""
    p = w.p
    ops: dict[str, Callable[[], Any]] = {
        "request": lambda: p.request(parse(ReturnRequestIn, payload), LATER, API),
        "quote": lambda: p.quote(parse(ReturnRequestIn, payload), LATER),
        "import": lambda: p.import_data(parse(ImportIn, payload)),
        "receipt": lambda: receive(p, parse(ReceiptIn, payload), LATER),
        "show": lambda: p.show(payload, LATER),
        "process": lambda: process(p, payload, LATER, API),
        "cancel": lambda: cancel(p, payload, "hostile", "alice", LATER),
        "review": lambda: review(p, payload, True, "hostile", "alice", LATER),
        "expire": lambda: p.expire(payload, LATER, LATER, Actor("sweep")),
    }
    INPUTS[f"in-process {kind}"] += 1
    try:
        out = ops[kind]()
    except ValidationError as exc:
        return one_line(explain(exc))
    except ReturnsError as exc:
        return one_line(str(exc))
    if kind == "import" and not any(out.as_dict().values()):
        return None
    if kind == "expire" and out is False:
        return None
    raise AssertionError(f"{kind} accepted a hostile input: {str(payload)[:200]!r} -> {out!r}")


def refused_without_trace(w: World, kind: str, payload: Any) -> str | None:
    before = w.snapshot()
    message = run_op(w, kind, payload)
    rows, files = w.snapshot()
    assert files == before[1], f"{kind}: files under RETURNS_HOME changed"
    changed = [t for t in rows if rows[t] != before[0][t]]
    assert not changed, f"{kind}: tables changed: {changed}"
    return message


# ---- valid bodies, and what makes them hostile -----------------------------------------------------------------------


def valid_request() -> dict[str, Any]:
    return {"order_number": "IS-1001", "email": "zoe.lukasiewicz@example.com", "reason": "unwanted",
            "lines": [{"sku": "CL-FACIAL-CLN", "quantity": 1, "unopened": True}], "idempotency_key": "hostile-1"}


def valid_import() -> dict[str, Any]:
    return {"products": [{"sku": "H-1", "name": "Hostile cream", "kind": "skincare", "size": "retail",
                          "price": "9.99"}],
            "customers": [{"account": "ACC-H1", "name": "Hal Hostile", "email": "hal@example.com",
                           "address": {"line1": "1 Main St", "city": "Lantana", "postal_code": "33462",
                                       "country": "US"}}],
            "orders": [{"number": "H-1", "account": "ACC-H1", "channel": "direct", "placed_at": NOW.isoformat(),
                        "lines": [{"sku": "H-1", "quantity": 1, "unit_price": "9.99", "unit_tax": "0.70"}],
                        "payments": [{"method": "visa", "amount": "10.69", "captured_at": NOW.isoformat()}]}]}


def valid_receipt(w: World) -> dict[str, Any]:
    return {"rma": w.authorized, "received_at": LATER.isoformat(), "by": "dock",
            "lines": [{"sku": "VC-SERUM-30", "unopened": 1}]}


def deep(depth: int) -> Any:
    x: Any = []
    for _ in range(depth):
        x = [x]
    return x


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value: the root, each key of each object, each item of each list."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, prefix + (i,))
    return out


def put(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = put(value[path[0]], path[1:], new)
    return copy


def objects(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return [p for p in paths(value, prefix) if isinstance(get(value, p), dict)]


def get(value: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        value = value[k]
    return value


# Values no field of the contract accepts, whatever its type: each makes the body invalid wherever it lands.
ALWAYS_INVALID = st.one_of(
    st.sampled_from([10**9, 10**30, -1, -(10**30), 1.5, -0.0, float("nan"), float("inf"), 1e308,
                     "\x00", "RMA-\x00ABCDEF", "a\nb", "\x1b[2J", "\x7f", "../../etc/passwd\x00",
                     SQL + "\x00", HTML + "\n", "2026-11-20T10:00:00\x00", "x" * (1024 * 1024), deep(300), [[]]]),
    st.text(min_size=1, max_size=20).map(lambda s: s + "\x00"),
    st.integers(min_value=10_001),
    st.integers(max_value=-1),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not float(f).is_integer()),
)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                    max_leaves=12)


@st.composite
def hostile(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """A valid body made invalid: a value replaced by one nothing accepts, or an unknown key added somewhere,
    or the whole body replaced by arbitrary JSON; sent as a Python value or as JSON text."""
    how = draw(st.sampled_from(["replace", "replace", "extra", "anything"]))
    if how == "replace":
        body = put(base, draw(st.sampled_from(paths(base))), draw(ALWAYS_INVALID))
    elif how == "extra":
        where = draw(st.sampled_from(objects(base)))
        key = draw(st.sampled_from(["coupon", "refund_to", "a\nb", "\x1b[2J", "k" * 5000, SQL, HTML]))
        body = put(base, where, get(base, where) | {key: draw(JSON)})
    else:
        body = draw(JSON)
    if draw(st.booleans()):
        return body
    try:
        return json.dumps(body)
    except (RecursionError, ValueError):
        return body


# ---- hand-written --------------------------------------------------------------------------------------------------


def hand_written(w: World) -> list[tuple[str, Any]]:
    r, i, c = valid_request(), valid_import(), valid_receipt(w)
    line = r["lines"][0]
    product, customer, order = i["products"][0], i["customers"][0], i["orders"][0]
    cases: list[tuple[str, Any]] = []
    # empty, non-UTF-8, not JSON, deeply nested
    for kind in ("request", "import", "receipt"):
        cases += [(kind, ""), (kind, b""), (kind, b"\xff\xfe\xfa"), (kind, "not json"), (kind, "null"), (kind, "[]"),
                  (kind, "[" * 100_000), (kind, "{" * 50_000), (kind, deep(5_000)), (kind, "\x00"), (kind, b"\xc3\x28"),
                  (kind, "{\"a\": NaN}"), (kind, 42), (kind, "\"" + TEN_MB + "\"")]
    # wrong types and huge numbers
    for q in (0, -1, 10**9, 10**30, 1.5, "1", "NaN", None, True, [], {}):
        cases.append(("request", r | {"lines": [line | {"quantity": q}]}))
    for v in (10**30, "NaN", 1.5, -1, None):
        cases += [("request", r | {"order_number": v}), ("request", r | {"email": v}), ("request", r | {"reason": v})]
        if v is not None:  # an `unopened` of null is "not stated": the rest of the SKU arrived unopened
            cases.append(("receipt", c | {"lines": [{"sku": "VC-SERUM-30", "unopened": v}]}))
    cases += [("receipt", c | {"lines": [{"sku": "VC-SERUM-30", "unopened": 10**9}]}),
              ("receipt", c | {"lines": [{"sku": "VC-SERUM-30", "unopened": 1, "missing": 10**30}]}),
              ("receipt", c | {"lines": [{"sku": "VC-SERUM-30", "unopened": 0}]}),  # well-formed, counts do not add up
              ("receipt", c | {"lines": [{"sku": "VC-SERUM-30", "unopened": 1}] * 2})]
    for price in ("1e9", "NaN", "-1.00", "99999999.99", "1.005", 9.99, 10**30, "", "Infinity"):
        cases.append(("import", i | {"products": [product | {"price": price}]}))
    # 10 MB strings and control characters, in every kind of field
    for v in (TEN_MB, "Zo\x00e", "line\nbreak", "\x1b[31mred", "tab\there", "\u202eevil"):
        cases += [("request", r | {"order_number": v}), ("request", r | {"idempotency_key": v}),
                  ("request", r | {"email": f"{v}@example.com"}), ("receipt", c | {"by": v}),
                  ("import", i | {"customers": [customer | {"name": v}]}),
                  ("import", i | {"products": [product | {"name": v}]})]
    # RMA numbers: traversal, NUL, SQL, HTML, huge, look-alikes with a wrong check symbol
    for rma in ("../../etc/passwd", "RMA-../../x", "RMA-\x00AAAAAA", "RMA-ABC\x00DEF", SQL, HTML, TEN_MB, "",
                "RMA-7K2QMXQ", "RMA-0000000\n", " ", "labels/RMA-7K2QMXP.pdf", "RMA-7K2QMXP/../../x", 42, None):
        for kind in ("show", "process", "cancel", "review", "expire"):
            cases.append((kind, rma))
        cases.append(("receipt", c | {"rma": rma}))
    # SQL and HTML where the contract allows only keys, e-mail addresses or known values
    for v in (SQL, HTML, "IS-1001' OR '1'='1", "IS-1001; DELETE FROM returns"):
        cases += [("request", r | {"order_number": v}), ("request", r | {"email": v}),
                  ("request", r | {"lines": [line | {"sku": v}]}), ("import", i | {"orders": [order | {"number": v}]}),
                  ("import", i | {"customers": [customer | {"account": v}]}), ("receipt", c | {"by": v})]
    # R13: well-formed, but the order is unknown or the email is not its account's
    cases += [("request", r | {"order_number": "IS-9999"}), ("request", r | {"email": "someone@example.com"}),
              ("quote", r | {"email": "ZOE.LUKASIEWICZ@example.com.evil"})]
    # times without an offset, and impossible times
    for t in ("2026-11-20T10:00:00", "2026-11-20", "2026-02-30T10:00:00Z", "yesterday", 1732100000, ""):
        cases += [("receipt", c | {"received_at": t}), ("import", i | {"orders": [order | {"placed_at": t}]})]
    cases += [("receipt", c | {"received_at": (LATER + timedelta(days=30)).isoformat()}),  # in the future
              ("receipt", c | {"received_at": (NOW - timedelta(days=30)).isoformat()})]  # before the RMA
    # unknown keys (hostile names), missing keys, referential nonsense
    cases += [("request", r | {"refund_to": "attacker"}), ("request", r | {"a\nb": 1}),
              ("request", r | {"k" * 100_000: 1}),
              ("request", {k: v for k, v in r.items() if k != "email"}), ("request", r | {"lines": []}),
              ("request", r | {"lines": [line] * 51}), ("request", r | {"lines": [line, line]}),
              ("import", i | {"orders": [order | {"account": "ACC-NOBODY"}]}),
              ("import", i | {"orders": [order | {"lines": [order["lines"][0] | {"sku": "NO-SUCH-SKU"}]}]}),
              ("import", i | {"orders": [order | {"lines": order["lines"] * 2}]}),
              ("import", i | {"orders": [order | {"account": "ACC-1002", "number": "IS-1001"}]}),
              ("import", i | {"products": [product] * 10_001})]
    return cases


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_hand_written_hostile_inputs_are_refused_in_one_line_and_change_nothing(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    w = build_world(tmp_path, url)
    cases = hand_written(w)
    messages = Counter()
    for kind, payload in cases:
        message = refused_without_trace(w, kind, payload)
        messages[(message or "accepted-noop").split(":")[0]] += 1
    INPUTS["hand-written cases"] += len(cases)
    INPUTS["invariant checks"] += check_invariants(w.p, mail_dir=w.p.settings.mail_dir)
    # R13: unknown order and wrong email answer with the very same words
    assert refused_without_trace(w, "request", valid_request() | {"order_number": "IS-9999"}) == \
        refused_without_trace(w, "request", valid_request() | {"email": "someone@example.com"})


# ---- generated -------------------------------------------------------------------------------------------------------


@settings(CI)
@given(data=st.data())
def test_generated_hostile_requests(world: World, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["request", "quote"]))
    refused_without_trace(world, kind, data.draw(hostile(valid_request())))
    INPUTS["generated"] += 1


@settings(CI)
@given(data=st.data())
def test_generated_hostile_imports(world: World, data: st.DataObject) -> None:
    refused_without_trace(world, "import", data.draw(hostile(valid_import())))
    INPUTS["generated"] += 1


@settings(CI)
@given(data=st.data())
def test_generated_hostile_receipts(world: World, data: st.DataObject) -> None:
    refused_without_trace(world, "receipt", data.draw(hostile(valid_receipt(world))))
    INPUTS["generated"] += 1


@settings(CI)
@given(rma=st.one_of(st.text(max_size=60), st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
                     st.from_regex(r"RMA-[0-9A-Z]{7}", fullmatch=True), st.integers(), st.none()))
def test_generated_hostile_rma_numbers(world: World, rma: Any) -> None:
    for kind in ("show", "process", "cancel", "review"):
        refused_without_trace(world, kind, rma)
    INPUTS["generated"] += 1


def test_generated_inputs_left_the_invariants_intact(world: World) -> None:
    INPUTS["invariant checks"] += check_invariants(world.p, mail_dir=world.p.settings.mail_dir)


# ---- hostile but well-formed: stored verbatim, harmless everywhere ---------------------------------------------------


def test_sql_and_html_in_names_are_data(tmp_path: Path) -> None:
    """A name may contain quotes, semicolons and angle brackets: it is stored as typed, the tables survive, and the
    email's HTML part shows it escaped."""
    w = build_world(tmp_path)
    body = valid_import()
    body["customers"][0]["name"] = f"{HTML} {SQL}"
    body["products"][0]["name"] = f"<b>Bold</b> {SQL}"
    w.p.import_data(parse(ImportIn, body))
    INPUTS["in-process import (well-formed hostile)"] += 1
    out = w.p.request(parse(ReturnRequestIn, {"order_number": "H-1", "email": "hal@example.com", "reason": "unwanted",
                                              "lines": [{"sku": "H-1", "quantity": 1}]}), NOW + timedelta(days=1), API)
    assert out.state == "authorized"
    w.p.render_label(out.rma_number)
    w.p.relay(NOW + timedelta(days=1))
    from models.tables import Customer, Product

    with unit_of_work(w.p.engine) as s:
        assert s.get(Customer, "ACC-H1").name == f"{HTML} {SQL}"  # type: ignore[union-attr]
        assert s.get(Product, "H-1").name == f"<b>Bold</b> {SQL}"  # type: ignore[union-attr]
    from email import message_from_bytes, policy

    issued = [message_from_bytes(f.read_bytes(), policy=policy.default) for f in (w.home / "mail").glob("*.eml")]
    ours = [m for m in issued if out.rma_number in str(m["Subject"])]
    assert ours, "the RMA email was sent"
    html = ours[0].get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "<script>" not in html and "<b>Bold</b>" not in html and "&lt;b&gt;Bold&lt;/b&gt;" in html
    INPUTS["invariant checks"] += check_invariants(w.p, mail_dir=w.p.settings.mail_dir)


# ---- the command line ------------------------------------------------------------------------------------------------


def cli(w: World, args: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
    env = os.environ | {"RETURNS_HOME": str(w.home), "RETURNS_DATABASE_URL": w.p.settings.database_url,
                        "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "entrypoints.cli", *args], cwd=ROOT, env=env, input=stdin or b"",
                          capture_output=True, timeout=120)
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


def cli_refuses(w: World, args: list[str], stdin: bytes | None = None) -> str:
    before = w.snapshot()
    code, out, err = cli(w, args, stdin)
    INPUTS["cli"] += 1
    assert code in (2, 3), (code, err[:500])
    assert out == "" and err.count("\n") == 1 and err.startswith("returns: error: "), err[:500]
    one_line(err.rstrip("\n"))
    rows, files = w.snapshot()
    assert files == before[1], f"{args[:2]}: files under RETURNS_HOME changed"
    assert rows == before[0], f"{args[:2]}: the database changed"
    return err


def test_cli_refuses_hostile_input_in_one_line(tmp_path: Path) -> None:
    w = build_world(tmp_path)
    r, c = valid_request(), valid_receipt(w)
    dumps: Callable[[Any], bytes] = lambda v: json.dumps(v).encode()  # noqa: E731
    bad_import = valid_import()
    bad_import["customers"][0]["name"] = f"{HTML} {SQL}"
    bad_import["orders"][0]["placed_at"] = "2026-11-20T10:00:00"  # no offset
    cases: list[tuple[list[str], bytes | None]] = [
        (["request", "-"], b""),
        (["request", "-"], b"\xff\xfe\xfa not utf-8"),
        (["request", "-"], dumps(r | {"order_number": TEN_MB})),
        (["request", "-"], b"[" * 200_000),
        (["request", "-"], dumps(r | {"lines": [{"sku": "CL-FACIAL-CLN", "quantity": 10**30}]})),
        (["request", "-"], dumps(r | {"a\nb": 1})),
        (["import", "-"], dumps(bad_import)),
        (["receive", "-"], dumps(c | {"lines": [{"sku": "VC-SERUM-30", "unopened": "NaN"}]})),
        (["receive", "-"], dumps(c | {"rma": "RMA-\x00ABCDEF"})),
        (["receive", "-"], dumps(c | {"received_at": "2026-11-22T10:00:00"})),
        (["show", "../../etc/passwd"], None),
        (["process", SQL], None),
        (["show", HTML], None),
        (["cancel", w.authorized, "--note", "x", "--by", "<script>alert(1)</script>"], None),
        (["review", w.authorized, "--authorize", "--reason", "other", "--note", "a\x1b[2Jb", "--by", "alice"], None),
        (["--now", "2026-11-20T10:00:00", "process", w.received], None),
        (["sweep", "--as-of", "1" + "0" * 30], None),
        (["request", str(tmp_path / "does-not-exist.json")], None),
    ]
    for args, stdin in cases:
        cli_refuses(w, args, stdin)


@settings(CI, max_examples=4)
@given(data=st.data())
def test_cli_refuses_generated_hostile_requests(world: World, data: st.DataObject) -> None:
    body = data.draw(hostile(valid_request()))
    text = body if isinstance(body, str) else json.dumps(body, allow_nan=True)
    cli_refuses(world, ["request", "-"], text.encode("utf-8", "surrogatepass"))
