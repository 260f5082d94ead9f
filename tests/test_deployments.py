"""prefect.yaml, the only list of deployments: one per stage flow, each schema-enforced, on the `returns` pool."""

# That `prefect deploy --all` registers them and both worker types run them is tests/test_worker.py's.

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "prefect.yaml"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return dict(yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def declared(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """The deployments keyed by (entrypoint, name): three flows share the deployment name 'operator'."""
    keys = [(d["entrypoint"], d["name"]) for d in doc["deployments"]]
    assert len(keys) == len(set(keys)), f"a deployment is listed twice: {sorted(keys)}"
    return {(d["entrypoint"], d["name"]): d for d in doc["deployments"]}


def concurrency(d: dict[str, Any]) -> int | None:
    limit = d.get("concurrency_limit")
    return limit.get("limit") if isinstance(limit, dict) else limit


def schedules(d: dict[str, Any]) -> list[dict[str, Any]]:
    assert "schedule" not in d, "use `schedules:` (a list); the singular key is the deprecated form"
    return list(d.get("schedules") or [])


def flow_at(entrypoint: str) -> Any:
    """The object an entrypoint (`flows/x.py:name`) names."""
    path, function = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)


def test_every_entrypoint_is_a_flow_and_every_flow_has_a_deployment(declared: dict[Any, Any]) -> None:
    for entrypoint, _ in declared:
        assert (ROOT / entrypoint.split(":")[0]).is_file(), entrypoint
        assert isinstance(flow_at(entrypoint), Flow), entrypoint
    flows = {f"flows/{path.name}:{name}" for path in sorted((ROOT / "flows").glob("*.py"))
             for name, obj in vars(importlib.import_module(f"flows.{path.stem}")).items()
             if isinstance(obj, Flow) and obj.fn.__module__ == f"flows.{path.stem}"}
    assert {key[0] for key in declared} == flows, "a flow with no deployment"


def test_the_deployment_names_the_entry_points_use(declared: dict[Any, Any]) -> None:
    from entrypoints.verbs import DEPLOYMENTS

    registered = {f"{flow_at(key[0]).name}/{key[1]}" for key in declared}
    assert set(DEPLOYMENTS.values()) <= registered


def test_every_deployment_enforces_its_parameter_schema_and_is_tagged(declared: dict[Any, Any]) -> None:
    assert {key: d.get("enforce_parameter_schema") for key, d in declared.items()} == {key: True for key in declared}
    assert {key: tuple(d.get("tags") or ()) for key, d in declared.items()} == {key: ("returns",) for key in declared}
    assert all(d.get("description") for d in declared.values())


def test_every_deployment_runs_on_the_returns_pool_from_the_checkout(doc: dict[str, Any],
                                                                     declared: dict[Any, Any]) -> None:
    assert {key: d["work_pool"]["name"] for key, d in declared.items()} == {key: "returns" for key in declared}
    assert doc["pull"] == [{"prefect.deployments.steps.set_working_directory":
                            {"directory": "{{ $RETURNS_CHECKOUT }}"}}]
    assert doc["prefect-version"] == importlib.import_module("prefect").__version__


def test_the_scheduled_deployments_run_one_at_a_time(declared: dict[Any, Any]) -> None:
    sweep = declared[("flows/returns.py:deadline_sweep", "hourly")]
    assert [(s.get("cron"), s.get("timezone")) for s in schedules(sweep)] == [("0 * * * *", "America/New_York")]
    relay = declared[("flows/returns.py:outbox_relay", "every-minute")]
    assert [float(s["interval"]) for s in schedules(relay)] == [60.0]
    assert (concurrency(sweep), concurrency(relay)) == (1, 1)
    reconcile = declared[("flows/reconcile.py:refund_reconciliation", "daily")]
    assert [(s.get("cron"), s.get("timezone")) for s in schedules(reconcile)] == [("30 6 * * *", "America/New_York")]
    assert concurrency(reconcile) == 1
    report = declared[("flows/desk.py:returns_report", "weekly")]
    assert [(s.get("cron"), s.get("timezone")) for s in schedules(report)] == [("0 7 * * 1", "America/New_York")]
    assert concurrency(report) == 1
    scheduled = {key for key, d in declared.items() if schedules(d)}
    assert scheduled == {("flows/returns.py:deadline_sweep", "hourly"), ("flows/returns.py:outbox_relay",
                                                                          "every-minute"),
                         ("flows/reconcile.py:refund_reconciliation", "daily"),
                         ("flows/desk.py:returns_report", "weekly")}
    assert all(s.get("active", True) for d in declared.values() for s in schedules(d))
    assert all(concurrency(d) is None for key, d in declared.items() if key not in scheduled)


def test_the_desk_deployments(declared: dict[Any, Any]) -> None:
    """The what-if runs on demand only; the report weekly and on demand; their forms refuse unknown fields."""
    what_if = declared[("flows/desk.py:policy_what_if", "on-demand")]
    assert not schedules(what_if)
    schema = flow_at(what_if["entrypoint"]).parameters.model_dump()
    policy = schema["definitions"]["PolicyChangesIn"]
    assert policy["additionalProperties"] is False
    assert {"full_refund_days", "restocking_fee_rate", "damage_report_hours", "rma_valid_days",
            "late_return_min_shelf_life_years", "processing_days"} <= set(policy["properties"])
    assert set(schema["properties"]) == {"policy", "since", "until"}
    report = flow_at(declared[("flows/desk.py:returns_report", "weekly")]["entrypoint"])
    assert set(report.parameters.model_dump()["properties"]) == {"since", "until"}
