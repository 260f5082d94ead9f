"""The `returns` verbs with PREFECT_API_URL set: each is a run of its deployment on a real Prefect server served by
the in-process worker, prints the same JSON as run here, and fails with the run's message as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from served import REQUESTS, Shop, open_shop, prefect_with_deployments

from entrypoints.verbs import DEPLOYMENTS
from tests.helpers import row_counts

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Shop, dict[str, str]]]:
    base = tmp_path_factory.mktemp("cli-prefect")
    with prefect_with_deployments(base) as env, open_shop(base / "shop", env) as shop:
        cli_env = env | {"RETURNS_HOME": str(shop.home), "RETURNS_DATABASE_URL": shop.pipeline.settings.database_url,
                         "PYTHONPATH": str(ROOT)}
        yield shop, cli_env


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "entrypoints.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return dict(json.loads(result.stdout))


def one_line_error(result: subprocess.CompletedProcess[str], code: int, contains: str) -> None:
    assert "Traceback" not in result.stdout + result.stderr
    assert (result.returncode, result.stdout) == (code, ""), result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("returns: error:") and contains in line, line


def runs_of(shop: Shop, verb: str) -> list[dict[str, Any]]:
    by_id = {"id": {"any_": [shop.deployment(DEPLOYMENTS[verb])["id"]]}}
    r = shop.call("POST", "/flow_runs/filter", json={"deployments": by_id, "sort": "EXPECTED_START_TIME_ASC"})
    assert r.status_code == 200, r.text
    return list(r.json())


def test_request_and_receive_are_runs_of_their_deployments_with_the_usual_json(
        shop: tuple[Shop, dict[str, str]]) -> None:
    s, env = shop
    body = json.dumps(REQUESTS["IS-1001"] | {"idempotency_key": "shell-1001"})
    out = ok(cli(env, "request", "-", stdin=body))
    assert (out["decision"], out["state"], out["refund_total"], out["replayed"]) == (
        "authorized", "authorized", "72.76", False)
    assert out["emails"] == {"pending": 0, "sent": 1, "failed": 0}
    rma = out["rma_number"]
    (run,) = runs_of(s, "request")
    assert run["name"] == "request-IS-1001" and run["state"]["type"] == "COMPLETED"
    assert "@" not in json.dumps(run["parameters"]), run["parameters"]  # the run holds a reference, not the email

    again = ok(cli(env, "request", "-", stdin=body))
    assert (again["rma_number"], again["replayed"]) == (rma, True)
    assert len(runs_of(s, "request")) == 1  # the same Prefect idempotency key: the same run

    receipt = {"rma": rma, "received_at": datetime.now(UTC).isoformat(), "by": "shell-dock",
               "lines": [{"sku": "VC-SERUM-30", "unopened": 1}]}
    done = ok(cli(env, "receive", "-", stdin=json.dumps(receipt)))
    assert (done["state"], done["refund_total"]) == ("completed", "72.76")
    assert done["emails"] == {"pending": 0, "sent": 3, "failed": 0}
    assert [r["name"] for r in runs_of(s, "receive")] == [f"receipt-{rma}"]


def test_review_cancel_sweep_and_relay_run_through_prefect(shop: tuple[Shop, dict[str, str]]) -> None:
    s, env = shop
    review = ok(cli(env, "request", "-", stdin=json.dumps(REQUESTS["IS-1006"] | {"idempotency_key": "shell-1006"})))
    assert review["state"] == "review"
    settled = ok(cli(env, "review", review["rma_number"], "--authorize", "--reason", "expiry_checked", "--note",
                     "lot checked", "--by", "alice"))
    assert (settled["rma_number"], settled["state"]) == (review["rma_number"], "authorized")
    assert runs_of(s, "review")[-1]["name"] == f"review-{review['rma_number']}"
    cancelled = ok(cli(env, "cancel", review["rma_number"], "--note", "withdrawn", "--by", "alice"))
    assert cancelled["state"] == "cancelled"

    swept = ok(cli(env, "sweep", "--as-of", (datetime.now(UTC) + timedelta(hours=1)).isoformat()))
    assert set(swept) >= {"as_of", "expired", "due_soon", "overdue", "processed", "labels", "board"}
    assert runs_of(s, "sweep")[-1]["state"]["type"] == "COMPLETED"
    relayed = ok(cli(env, "relay"))
    assert set(relayed) >= {"sent", "failed"}
    assert runs_of(s, "relay")


def test_a_failed_run_prints_its_message_as_one_line_and_changes_nothing(shop: tuple[Shop, dict[str, str]]) -> None:
    s, env = shop
    out = ok(cli(env, "request", "-", stdin=json.dumps(REQUESTS["IS-1002"] | {"idempotency_key": "shell-1002"})))
    before = row_counts(s.pipeline)
    wrong = {"rma": out["rma_number"], "received_at": datetime.now(UTC).isoformat(),
             "lines": [{"sku": "PV-SPF50-91", "unopened": 1}]}  # two units on the RMA
    one_line_error(cli(env, "receive", "-", stdin=json.dumps(wrong)), 2, "units counted")
    assert runs_of(s, "receive")[-1]["state"]["type"] == "FAILED"
    one_line_error(cli(env, "process", out["rma_number"]), 2, "not waiting to be processed")
    assert row_counts(s.pipeline) == before


def test_now_cannot_reach_a_flow_run(shop: tuple[Shop, dict[str, str]]) -> None:
    _, env = shop
    one_line_error(cli(env, "--now", "2026-11-20T10:00:00-05:00", "relay"), 2, "unset PREFECT_API_URL")


def test_without_a_prefect_api_the_verbs_run_here(shop: tuple[Shop, dict[str, str]]) -> None:
    s, env = shop
    here = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    before = len(runs_of(s, "relay"))
    assert set(ok(cli(here, "relay"))) >= {"sent", "failed"}
    assert len(runs_of(s, "relay")) == before
    assert os.environ.get("PREFECT_API_URL") != env["PREFECT_API_URL"]  # this process never pointed at it
