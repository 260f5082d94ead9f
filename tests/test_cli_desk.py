"""`returns what-if` and `returns export` in subprocesses over the known history (tests/desk_history.py): JSON and
CSV out, nothing written, bad input refused in one line with the input exit code."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from adapters.config import load_settings
from adapters.db import make_engine, upgrade
from service.report import CSV_COLUMNS
from service.steps import Pipeline
from tests import desk_history
from tests.test_cli import SAMPLE, assert_clean_failure, cli, db_url, ok, row_counts

DAY = ("--since", "2026-11-20", "--until", "2026-11-20")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose SQLite database holds the known history, built in-process."""
    home = tmp_path_factory.mktemp("cli-desk")
    url = db_url(home)
    upgrade(url)
    engine = make_engine(url)
    desk_history.build(Pipeline(settings=load_settings({"RETURNS_HOME": str(home), "RETURNS_DATABASE_URL": url}),
                                engine=engine))
    engine.dispose()
    return home


def test_what_if_prints_the_changed_decisions_and_writes_nothing(home: Path) -> None:
    before = row_counts(home)
    same = ok(cli(home, "what-if", "-", *DAY, stdin="{}"))
    assert (same["replayed"], same["changed"], same["returns"]) == (5, 0, [])
    out = ok(cli(home, "what-if", "-", *DAY, stdin=json.dumps({"full_refund_days": 90})))
    assert out["changed"] == 2 and {r["order_number"] for r in out["returns"]} == {"IS-1002", "IS-1008"}
    assert out["money"]["restocking_fees"] == {"before": "18.40", "after": "0.00", "moves": "-18.40"}
    fee = ok(cli(home, "what-if", "-", stdin=json.dumps({"restocking_fee_rate": "0.15"})))  # the whole history
    # IS-1002's fee is 15 % of 92.00; IS-1008's changes too, but its RMA expired, so no fee was ever due.
    assert fee["changed"] == 2 and fee["money"]["restocking_fees"] == {"before": "18.40", "after": "13.80",
                                                                       "moves": "-4.60"}
    assert row_counts(home) == before


def test_what_if_reads_a_policy_file(home: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"full_refund_days": 10}), encoding="utf-8")
    out = ok(cli(home, "what-if", str(policy), *DAY))
    # IS-1001 was bought 15 days before its request: P4 with a 13.60 fee instead of P3.
    assert [(r["order_number"], r["changes"]) for r in out["returns"]] == [
        ("IS-1001", ["VC-SERUM-30: authorized P3 -> authorized P4"])]
    assert (out["returns"][0]["fee_before"], out["returns"][0]["fee_after"]) == ("0.00", "13.60")


def test_export_prints_a_csv_of_the_period_with_no_personal_data(home: Path) -> None:
    result = cli(home, "export", *DAY)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 8  # one per return line: 1 + 2 + 1 + 3 + 1
    assert {r["order_number"] for r in rows} == set(desk_history.ORDERS)
    paid = {(r["order_number"], r["sku"]): r["settled_refund"] for r in rows if r["settled_refund"]}
    assert paid == {("IS-1001", "VC-SERUM-30"): "72.76", ("IS-1002", "PV-SPF50-91"): "40.02"}
    customers = json.loads((SAMPLE / "catalog.json").read_text(encoding="utf-8"))["customers"]
    assert "@" not in result.stdout
    assert not [c["name"] for c in customers if c["name"] in result.stdout]
    assert not [c["address"]["line1"] for c in customers if c["address"]["line1"] in result.stdout]
    empty = cli(home, "export", "--since", "2026-01-01", "--until", "2026-01-31")
    assert empty.stdout.splitlines() == [",".join(CSV_COLUMNS)]


BAD = [
    pytest.param(["what-if", "-"], '{"full_refund_days": 45, "refund_everything": true}', "unknown field",
                 id="unknown-field"),
    pytest.param(["what-if", "-"], '{"timezone": "UTC"}', "not a number a what-if replays", id="not-replayed"),
    pytest.param(["what-if", "-"], '{"restocking_fee_rate": 0.15}', "restocking_fee_rate", id="rate-not-a-string"),
    pytest.param(["what-if", "-"], '{"restocking_fee_rate": "1.5"}', "restocking_fee_rate", id="rate-above-one"),
    pytest.param(["what-if", "-"], '{"full_refund_days": -3}', "full_refund_days", id="negative-days"),
    pytest.param(["what-if", "-"], '{"full_refund_days": 45', "not valid JSON", id="bad-json"),
    pytest.param(["what-if", "-"], '[1, 2]', "input", id="not-an-object"),
    pytest.param(["what-if", "/nonexistent/policy.json"], None, "cannot read", id="missing-file"),
    pytest.param(["what-if", "-", "--since", "2026-13-01"], "{}", "--since is not a date", id="bad-date"),
    pytest.param(["what-if", "-", "--since", "2026-11-21", "--until", "2026-11-20"], "{}", "after it ends",
                 id="since-after-until"),
    pytest.param(["export", "--since", "yesterday", "--until", "2026-11-20"], None, "--since is not a date",
                 id="export-bad-date"),
]


@pytest.mark.parametrize(("args", "stdin", "message"), BAD)
def test_bad_input_fails_in_one_line_and_writes_nothing(home: Path, args: list[str], stdin: str | None,
                                                        message: str) -> None:
    before = row_counts(home)
    assert_clean_failure(cli(home, *args, stdin=stdin), 2, message)
    assert row_counts(home) == before


def test_a_refused_what_if_on_a_fresh_home_creates_nothing(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    result: Any = cli(fresh, "what-if", "-", stdin='{"bogus": 1}')
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert not fresh.exists() or not any(fresh.iterdir())
