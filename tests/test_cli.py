"""The `returns` command end to end, in subprocesses: JSON in and out, exit codes, one-line errors, and bad input
that leaves the database exactly as it was.

Set-up that is not under test (migrating, importing, earlier requests) is done in-process on the same SQLite file,
to keep the number of subprocesses small.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters.config import load_settings
from adapters.db import make_engine, upgrade
from models.rma import ALPHABET
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, parse
from service.steps import Pipeline
from tests import helpers
from tests.helpers import LATER, NOW

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample"
REQUESTS = {s["request"]["order_number"]: s["request"]
            for s in json.loads((SAMPLE / "requests.json").read_text(encoding="utf-8"))}


# ---- helpers ---------------------------------------------------------------------------------------------------


def db_url(home: Path) -> str:
    return f"sqlite:///{home / 'returns.db'}"


def cli(
    home: Path, *args: str, stdin: str | bytes | None = None, now: str | None = NOW.isoformat()
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETURNS_")}
    env |= {"RETURNS_HOME": str(home), "RETURNS_DATABASE_URL": db_url(home),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "entrypoints.cli", *(["--now", now] if now else []), *args]
    data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
    done = subprocess.run(argv, input=data, capture_output=True, env=env, cwd=ROOT, timeout=120, check=False)
    return subprocess.CompletedProcess(argv, done.returncode, done.stdout.decode("utf-8", "replace"),
                                       done.stderr.decode("utf-8", "replace"))


def ok(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def row_counts(home: Path) -> dict[str, int]:
    engine = make_engine(db_url(home))
    try:
        return helpers.row_counts(engine)
    finally:
        engine.dispose()


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int, contains: str) -> None:
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == code, (result.returncode, result.stderr[:500])
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[:500]
    assert lines[0].startswith("returns: error:")
    assert contains in lines[0], lines[0]
    assert len(lines[0]) < 400  # never echoes a huge or hostile value


def needs_side_effects() -> None:
    """Mutating commands also render the label and relay the outbox (other people's modules)."""
    pytest.importorskip("adapters.label.layout")
    pytest.importorskip("adapters.mail.transport")
    pytest.importorskip("service.relay")


def seed(home: Path, *orders: str) -> tuple[Pipeline, dict[str, str | None]]:
    """Migrate, import the sample and make the given sample requests in-process; the CLI then takes over."""
    home.mkdir(parents=True, exist_ok=True)
    url = db_url(home)
    upgrade(url)
    engine = make_engine(url)
    p = Pipeline(settings=load_settings({"RETURNS_HOME": str(home), "RETURNS_DATABASE_URL": url}), engine=engine)
    p.import_data(parse(ImportIn, (SAMPLE / "catalog.json").read_text(encoding="utf-8")))
    made = {o: helpers.request(p, parse(ReturnRequestIn, REQUESTS[o])).rma_number for o in orders}
    return p, made


def mistype(rma: str) -> str:
    last = rma[-1]
    return rma[:-1] + next(ch for ch in ALPHABET if ch != last)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A shared database: the sample imported, IS-1001 authorized (1 of 2 serums held), IS-1006 in review."""
    home = tmp_path_factory.mktemp("cli-seeded")
    p, made = seed(home, "IS-1001", "IS-1006")
    p.engine.dispose()
    return home, {o: rma for o, rma in made.items() if rma}


# ---- the happy paths -----------------------------------------------------------------------------------------


def test_db_upgrade_then_import_twice_is_idempotent(tmp_path: Path) -> None:
    assert ok(cli(tmp_path, "db", "upgrade")) == {"upgraded": True}
    first = ok(cli(tmp_path, "import", str(SAMPLE / "catalog.json")))
    assert first == {"products": 13, "customers": 8, "orders_added": 11, "orders_updated": 0}
    counts = row_counts(tmp_path)
    assert counts["orders"] == 11 and counts["order_lines"] == 18 and counts["payments"] == 12
    second = ok(cli(tmp_path, "import", str(SAMPLE / "catalog.json")))
    assert second["orders_added"] == 0 and second["orders_updated"] == 0
    assert row_counts(tmp_path) == counts


def test_quote_writes_nothing(seeded: tuple[Path, dict[str, str]]) -> None:
    home, _ = seeded
    before = row_counts(home)
    out = ok(cli(home, "quote", "-", stdin=json.dumps(REQUESTS["IS-1002"])))
    assert out["decision"] == "authorized"
    assert out["refund_total"] == "80.04"
    assert [(ln["sku"], ln["decision"], ln["restocking_fee"]) for ln in out["lines"]] == [
        ("PV-SPF50-91", "authorized", "18.40"), ("OR-GEL-POL", "declined", "0.00")]
    assert row_counts(home) == before


def test_show_an_rma_typed_loosely(seeded: tuple[Path, dict[str, str]]) -> None:
    home, rmas = seeded
    rma = rmas["IS-1001"]
    out = ok(cli(home, "show", rma.lower().replace("-", " ")))
    assert out["rma_number"] == rma
    assert out["state"] == "authorized"
    assert out["order_number"] == "IS-1001"
    assert out["lines"][0]["refund"] == "72.76"
    assert [(t["from"], t["to"]) for t in out["timeline"]] == [(None, "requested"), ("requested", "authorized")]
    assert datetime.fromisoformat(out["rma_valid_until"]) == NOW + timedelta(days=30)


def test_request_then_receive_completes_then_show(tmp_path: Path) -> None:
    needs_side_effects()
    p, _ = seed(tmp_path)
    p.engine.dispose()
    out = ok(cli(tmp_path, "request", "-", stdin=json.dumps(REQUESTS["IS-1001"])))
    assert out["decision"] == "authorized"
    assert out["policy_version"] == "image-skincare-2026.1"
    assert out["refund_total"] == "72.76"
    rma = out["rma_number"]
    assert rma and rma.startswith("RMA-")
    (line,) = out["lines"]
    assert {k: line[k] for k in ("sku", "quantity", "decision", "clauses", "refund", "restocking_fee")} == {
        "sku": "VC-SERUM-30", "quantity": 1, "decision": "authorized", "clauses": ["P3", "R1", "R3"],
        "refund": "72.76", "restocking_fee": "0.00"}
    assert line["reason"]
    assert (tmp_path / "labels" / f"{rma}.pdf").exists()

    receipt = {"rma": rma, "received_at": LATER.isoformat(), "lines": [{"sku": "VC-SERUM-30", "unopened": 1}]}
    # The dock's stage: the receipt starts the 10-day clock (P8) and the return is processed at once.
    done = ok(cli(tmp_path, "receive", "-", stdin=json.dumps(receipt), now=LATER.isoformat()))
    assert done["state"] == "completed"
    assert done["refund_total"] == "72.76"
    assert [pay["amount"] for pay in done["payments"]] == ["72.76"]
    assert done["emails"] == {"sent": 3, "pending": 0, "failed": 0}  # RMA issued, received, processed

    shown = ok(cli(tmp_path, "show", rma, now=LATER.isoformat()))
    assert shown["state"] == "completed"
    assert [(x["method"], x["last4"], x["amount"]) for x in shown["payments_refunded"]] == [("visa", "4242", "72.76")]

    before = row_counts(tmp_path)
    assert_clean_failure(cli(tmp_path, "process", rma, now=LATER.isoformat()), 2, "not waiting to be processed")
    assert row_counts(tmp_path) == before


def test_sweep_as_of_expires_a_stale_rma(tmp_path: Path) -> None:
    needs_side_effects()
    p, made = seed(tmp_path, "IS-1008")
    p.engine.dispose()
    rma = made["IS-1008"]
    early = ok(cli(tmp_path, "sweep", "--as-of", (NOW + timedelta(days=29)).isoformat()))
    assert early["expired"] == []
    out = ok(cli(tmp_path, "sweep", "--as-of", (NOW + timedelta(days=30)).isoformat()))
    assert out["expired"] == [rma]
    assert out["board"]["counts"] == {"expired": 1}


def test_review_authorize_before_receipt_issues_the_rma(tmp_path: Path) -> None:
    needs_side_effects()
    p, made = seed(tmp_path, "IS-1006")
    p.engine.dispose()
    rma = made["IS-1006"]
    out = ok(cli(tmp_path, "review", rma, "--authorize", "--reason", "other", "--note", "x", "--by", "alice"))
    assert out["rma_number"] == rma and out["state"] == "authorized"
    assert (tmp_path / "labels" / f"{rma}.pdf").exists()


def test_review_authorize_after_receipt_completes_the_return(tmp_path: Path) -> None:
    needs_side_effects()
    p, made = seed(tmp_path, "IS-1011")
    rma = made["IS-1011"]
    helpers.receive(p, parse(ReceiptIn, {"rma": rma, "received_at": LATER.isoformat(), "lines": [
        {"sku": "AG-RET-SRM", "damaged": 1}, {"sku": "IL-FIRM-MASK", "unopened": 1}]}))
    p.engine.dispose()
    out = ok(cli(tmp_path, "review", rma, "--authorize", "--reason", "damage_confirmed", "--note", "courier damage",
                 "--by", "alice", now=(LATER + timedelta(hours=1)).isoformat()))
    assert out["state"] == "completed"
    assert out["refund_total"] == "132.68"


def test_cancel(tmp_path: Path) -> None:
    needs_side_effects()
    p, made = seed(tmp_path, "IS-1001")
    p.engine.dispose()
    rma = made["IS-1001"]
    out = ok(cli(tmp_path, "cancel", rma, "--note", "changed my mind", "--by", "bob"))
    assert out["rma_number"] == rma and out["state"] == "cancelled"


# ---- R13 -----------------------------------------------------------------------------------------------------


def test_unknown_order_and_wrong_email_fail_identically(seeded: tuple[Path, dict[str, str]]) -> None:
    home, _ = seeded
    before = row_counts(home)
    unknown = cli(home, "request", "-", stdin=json.dumps(REQUESTS["IS-1002"] | {"order_number": "IS-9999",
                                                                              "idempotency_key": "k-1"}))
    wrong = cli(home, "request", "-", stdin=json.dumps(REQUESTS["IS-1002"] | {"email": "zoe.lukasiewicz@example.com",
                                                                            "idempotency_key": "k-2"}))
    assert_clean_failure(unknown, 3, "no order matches")
    assert_clean_failure(wrong, 3, "no order matches")
    assert unknown.stderr == wrong.stderr
    assert row_counts(home) == before


# ---- bad input: one line on stderr, nothing written ----------------------------------------------------------


def _req(**changes: Any) -> str:
    return json.dumps(REQUESTS["IS-1001"] | {"idempotency_key": "bad-input"} | changes)


def _line(**changes: Any) -> str:
    return _req(lines=[{"sku": "VC-SERUM-30", "quantity": 1, "unopened": True} | changes])


BAD_REQUESTS = [
    pytest.param('{"order_number": "IS-1001", "email": ', "not valid JSON", id="malformed-json"),
    pytest.param(b'{"order_number": "\xff\xfe"}', "not valid JSON", id="not-utf8"),
    pytest.param("[" * 100_000, "not valid JSON", id="nested-too-deep"),
    pytest.param(_req(coupon="FREE"), "unknown field", id="unknown-field"),
    pytest.param(json.dumps({k: v for k, v in REQUESTS["IS-1001"].items() if k != "email"}), "email: field required",
                 id="missing-field"),
    pytest.param(_line(quantity=0), "lines.0.quantity", id="quantity-0"),
    pytest.param(_line(quantity=-1), "lines.0.quantity", id="quantity-negative"),
    pytest.param(_line(quantity="1"), "lines.0.quantity", id="quantity-string"),
    pytest.param(_line(quantity=1.0), "lines.0.quantity", id="quantity-float"),
    pytest.param(_line(quantity=2), "R11", id="more-units-than-left"),
    pytest.param(_line(sku="NO-SUCH-SKU"), "unknown sku", id="unknown-sku"),
    pytest.param(_line(sku="VC-SERUM-30\u0007"), "has characters that are not allowed", id="control-char-sku"),
    pytest.param(_req(email="zoe\u0000@example.com"), "email", id="control-char-email"),
    pytest.param(_req(email="a" * 10_000_000 + "@example.com"), "email", id="10MB-string"),
    pytest.param(_req(resolution="replacement"), "does not apply", id="wrong-resolution"),
]


@pytest.mark.parametrize(("stdin", "message"), BAD_REQUESTS)
def test_bad_request_fails_cleanly_and_writes_nothing(
    seeded: tuple[Path, dict[str, str]], stdin: str | bytes, message: str
) -> None:
    home, _ = seeded
    before = row_counts(home)
    assert_clean_failure(cli(home, "request", "-", stdin=stdin), 2, message)
    assert row_counts(home) == before


def _receipt(rma: str, **changes: Any) -> str:
    return json.dumps({"rma": rma, "received_at": LATER.isoformat(), "lines": [{"sku": "VC-SERUM-30", "unopened": 1}],
                       "by": "dock"} | changes)


BAD_COMMANDS = [
    pytest.param(lambda r: (["show", mistype(r["IS-1001"])], None, None), "check character", id="show-check-char"),
    pytest.param(lambda r: (["show", "../../etc/passwd"], None, None), "looks like", id="show-dotdot"),
    pytest.param(lambda r: (["process", "RMA-../" + r["IS-1001"][4:]], None, None), "looks like", id="process-dotdot"),
    pytest.param(lambda r: (["receive", "-"], _receipt("../" + r["IS-1001"]), None), "looks like",
                 id="receive-dotdot"),
    pytest.param(lambda r: (["receive", "-"], _receipt(mistype(r["IS-1001"])), None), "check character",
                 id="receive-check-char"),
    pytest.param(lambda r: (["receive", "-"], _receipt(r["IS-1001"], received_at="2026-11-24T10:00:00"), None),
                 "UTC offset", id="receive-naive-time"),
    pytest.param(lambda r: (["receive", "-"], _receipt(r["IS-1001"], lines=[{"sku": "VC-SERUM-30", "unopened": 2}]),
                            LATER.isoformat()), "units counted", id="receive-wrong-count"),
    pytest.param(lambda r: (["receive", "-"], _receipt(r["IS-1001"], lines=[{"sku": "CL-FACIAL-CLN", "unopened": 1}]),
                            LATER.isoformat()), "not on", id="receive-sku-not-on-rma"),
    pytest.param(lambda r: (["receive", "-"], _receipt(r["IS-1001"], by="dock\u001b[2J"), None),
                 "has characters that are not allowed", id="receive-control-chars"),
    pytest.param(lambda r: (["show", r["IS-1001"]], None, "2026-11-20T10:00:00"), "UTC offset", id="now-naive"),
    pytest.param(lambda r: (["sweep", "--as-of", "2026-12-20"], None, None), "UTC offset", id="as-of-naive"),
    pytest.param(lambda r: (["process", r["IS-1001"]], None, None), "not waiting", id="process-not-received"),
    pytest.param(lambda r: (["review", r["IS-1001"], "--authorize", "--reason", "other", "--note", "x", "--by",
                             "alice"], None, None),
                 "not in review", id="review-not-in-review"),
    pytest.param(lambda r: (["review", r["IS-1006"], "--authorize", "--reason", "other", "--note", "x", "--by",
                             "alice\u001b"], None, None),
                 "--by", id="review-control-char-operator"),
    pytest.param(lambda r: (["cancel", r["IS-1001"], "--note", "bye\u0007", "--by", "bob"], None, None), "--note",
                 id="cancel-control-char-note"),
    pytest.param(lambda r: (["cancel", r["IS-1006"], "--note", "bye", "--by", "bob"], None, None),
                 "only an authorized return", id="cancel-in-review"),
    pytest.param(lambda r: (["import", "-"], json.dumps({"orders": [{"number": "IS-2000", "account": "ACC-1001",
                 "channel": "direct", "placed_at": NOW.isoformat(), "lines": [{"sku": "GHOST", "quantity": 1,
                 "unit_price": "1.00", "unit_tax": "0.00"}]}]}), None), "unknown sku", id="import-unknown-sku"),
    pytest.param(lambda r: (["import", "/nonexistent/catalog.json"], None, None), "cannot read", id="import-missing"),
]


@pytest.mark.parametrize(("command", "message"), BAD_COMMANDS)
def test_bad_command_fails_cleanly_and_writes_nothing(
    seeded: tuple[Path, dict[str, str]], command: Any, message: str
) -> None:
    home, rmas = seeded
    args, stdin, now = command(rmas)
    before = row_counts(home)
    result = cli(home, *args, stdin=stdin, now=now or NOW.isoformat())
    assert_clean_failure(result, 2, message)
    assert row_counts(home) == before


@pytest.mark.parametrize("args,stdin", [
    (("request", "-"), "{not json"),
    (("receive", "-"), '{"rma": "RMA-1", "received_at": "2026-11-24T11:00:00", "lines": []}'),
    (("show", "RMA-../../x"), None),
    (("review", "RMA-7K2QMXP", "--authorize", "--reason", "other", "--note", "ok", "--by", "a\x01b"), None),
])
def test_a_refused_command_on_a_fresh_home_creates_nothing(tmp_path: Path, args: tuple[str, ...],
                                                           stdin: str | None) -> None:
    home = tmp_path / "fresh"
    result = cli(home, *args, stdin=stdin)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert not home.exists() or not any(home.iterdir()), sorted(p.name for p in home.rglob("*"))
