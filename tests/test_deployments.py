"""prefect.yaml and flows.serve.deployment_specs() describe the same deployments: the served demo and `prefect deploy`
in production must register the same names, entrypoints, schedules, limits and enforced parameter schemas."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow

from flows.serve import DeploymentSpec, deployment_specs

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "prefect.yaml"


def entrypoint(spec: DeploymentSpec) -> str:
    return f"{spec.flow.fn.__module__.replace('.', '/')}.py:{spec.flow.fn.__name__}"


@pytest.fixture(scope="module")
def declared() -> dict[tuple[str, str], dict[str, Any]]:
    """prefect.yaml's deployments keyed by (entrypoint, name): three flows share the deployment name 'operator'."""
    if not PREFECT_YAML.exists():
        pytest.skip("prefect.yaml does not exist yet at the repository root")
    doc = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))
    keys = [(d["entrypoint"], d["name"]) for d in doc["deployments"]]
    assert len(keys) == len(set(keys)), f"a deployment is listed twice: {sorted(keys)}"
    return {(d["entrypoint"], d["name"]): d for d in doc["deployments"]}


@pytest.fixture(scope="module")
def specs() -> dict[tuple[str, str], DeploymentSpec]:
    found = {(entrypoint(s), s.name): s for s in deployment_specs()}
    assert len(found) == len(deployment_specs())
    return found


def concurrency(d: dict[str, Any]) -> int | None:
    limit = d.get("concurrency_limit")
    return limit.get("limit") if isinstance(limit, dict) else limit


def schedules(d: dict[str, Any]) -> list[dict[str, Any]]:
    assert "schedule" not in d, "use `schedules:` (a list); the singular key is the deprecated form"
    return list(d.get("schedules") or [])


def test_the_same_deployments_by_name_and_entrypoint(declared: dict[Any, Any], specs: dict[Any, Any]) -> None:
    assert sorted(declared) == sorted(specs)


def test_every_entrypoint_is_the_flow_the_server_serves(declared: dict[Any, Any], specs: dict[Any, Any]) -> None:
    for path, function in (key[0].split(":") for key in declared):
        assert (ROOT / path).is_file(), path
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, function), Flow), function
    served = {id(s.flow) for s in specs.values()}
    flows = [name for name, obj in vars(module).items() if isinstance(obj, Flow)]
    assert sorted(n for n in flows if id(getattr(module, n)) in served) == sorted(flows), "a flow with no deployment"


def test_every_deployment_enforces_its_parameter_schema(declared: dict[Any, Any]) -> None:
    assert {key: d.get("enforce_parameter_schema") for key, d in declared.items()} == {key: True for key in declared}


def test_descriptions_tags_and_concurrency_limits_match(declared: dict[Any, Any], specs: dict[Any, Any]) -> None:
    for key, spec in specs.items():
        d = declared[key]
        assert d.get("description") == spec.description, key
        assert sorted(d.get("tags") or []) == sorted(spec.tags), key
        assert concurrency(d) == spec.concurrency_limit, key


def test_schedules_match(declared: dict[Any, Any], specs: dict[Any, Any]) -> None:
    for key, spec in specs.items():
        got = schedules(declared[key])
        if spec.cron:
            assert [(s.get("cron"), s.get("timezone")) for s in got] == [(spec.cron, "America/New_York")], key
        elif spec.interval_seconds:
            assert [float(s.get("interval", 0)) for s in got] == [float(spec.interval_seconds)], key
            assert all("cron" not in s and "rrule" not in s for s in got), key
        else:
            assert got == [], f"{key} runs on demand only"
        assert all(s.get("active", True) for s in got), key


def test_the_sweep_runs_hourly_one_at_a_time_and_the_relay_every_minute(specs: dict[Any, Any]) -> None:
    sweep = specs[("flows/returns.py:deadline_sweep", "hourly")]
    assert (sweep.cron, sweep.interval_seconds, sweep.concurrency_limit) == ("0 * * * *", None, 1)
    relay = specs[("flows/returns.py:outbox_relay", "every-minute")]
    assert (relay.cron, relay.interval_seconds) == (None, 60)
    assert relay.concurrency_limit == 1
