"""The local Prefect server our entry points start: its timestamps on PostgreSQL bound as plain datetimes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pendulum
import pytest
import sqlalchemy as sa
from conftest import PG_ADMIN_URL, require_postgres
from helpers import free_port
from prefect.server.utilities import database
from sqlalchemy.dialects import postgresql, sqlite

from entrypoints.prefect_server import prefect_env, server_command, start_server, stdlib_timestamps, stop_server


@pytest.mark.parametrize(("env", "module"), [
    ({}, "prefect"),
    ({"PREFECT_API_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:///x.db"}, "prefect"),
    ({"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://p@h/d"}, "entrypoints.prefect_server"),
    ({"PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgresql+asyncpg://p@h/d"}, "entrypoints.prefect_server"),
])
def test_only_a_server_on_postgres_runs_through_the_timestamp_fix(env: dict[str, str], module: str) -> None:
    assert server_command(env) == module


def test_postgres_timestamps_are_bound_as_equal_plain_datetimes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Undone after the test: the session's Prefect harness keeps Prefect's own binding.
    monkeypatch.setattr(database.Timestamp, "process_bind_param", database.Timestamp.process_bind_param)
    column = database.Timestamp()
    berlin = pendulum.datetime(2026, 3, 29, 3, 30, 0, 123456, tz="Europe/Berlin")  # just after the clocks went on
    assert type(column.process_bind_param(berlin, postgresql.dialect())) is not datetime, "Prefect binds stdlib now"

    assert stdlib_timestamps()
    assert stdlib_timestamps()  # a second call wraps nothing twice
    bound = column.process_bind_param(berlin, postgresql.dialect())
    assert type(bound) is datetime
    assert bound == berlin
    assert bound == datetime(2026, 3, 29, 1, 30, 0, 123456, UTC)
    assert column.process_bind_param(None, postgresql.dialect()) is None
    # SQLite keeps Prefect's own conversion, untouched.
    assert column.process_bind_param(berlin, sqlite.dialect()) == berlin
    with pytest.raises(ValueError, match="timezone"):
        column.process_bind_param(datetime(2026, 1, 1), postgresql.dialect())  # noqa: DTZ001 - a naive one, refused


@pytest.fixture
def prefect_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one Prefect server (dropped afterwards), as its asyncpg URL."""
    require_postgres()
    name = f"prefect_t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(PG_ADMIN_URL).set(drivername="postgresql+asyncpg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.slow
@pytest.mark.prefect
def test_the_local_server_on_postgres_stores_flow_run_and_event_times_unchanged(
        prefect_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", prefect_database)
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL", "0.2")
    port = free_port()
    server = start_server(tmp_path / "prefect", port=port)
    try:
        api = prefect_env(tmp_path / "prefect", port)["PREFECT_API_URL"]
        with httpx.Client(base_url=api, timeout=30) as http:
            flow_id = http.post("/flows/", json={"name": "timestamps"}).raise_for_status().json()["id"]
            at = datetime(2026, 12, 24, 9, 15, 30, 654321, timezone(timedelta(hours=-5)))
            state = {"type": "SCHEDULED", "name": "Scheduled", "state_details": {"scheduled_time": at.isoformat()}}
            run = http.post("/flow_runs/", json={"flow_id": flow_id, "state": state}).raise_for_status().json()
            read = http.get(f"/flow_runs/{run['id']}").raise_for_status().json()
            assert datetime.fromisoformat(read["next_scheduled_start_time"]) == at
            assert datetime.fromisoformat(read["state"]["state_details"]["scheduled_time"]) == at

            occurred = datetime(2026, 7, 4, 23, 59, 59, 999999, timezone(timedelta(hours=2)))
            event = {"id": str(uuid.uuid4()), "occurred": occurred.isoformat(), "event": "returns.test.timestamps",
                     "resource": {"prefect.resource.id": "returns.test.1"},
                     "related": [{"prefect.resource.id": f"prefect.flow-run.{run['id']}",
                                  "prefect.resource.role": "flow-run"}]}
            http.post("/events", json=[event]).raise_for_status()
            query = {"filter": {"event": {"name": ["returns.test.timestamps"]},
                                "occurred": {"since": "2026-07-01T00:00:00Z", "until": "2026-07-31T00:00:00Z"}}}
            found: list[dict[str, object]] = []
            deadline = time.monotonic() + 30
            while not found and time.monotonic() < deadline:
                found = http.post("/events/filter", json=query).raise_for_status().json()["events"]
                time.sleep(0.2)
            assert [e["id"] for e in found] == [event["id"]]
            assert datetime.fromisoformat(str(found[0]["occurred"])) == occurred
            # the related resource's row, filtered on its own copy of the time
            query["filter"]["related"] = {"id": [f"prefect.flow-run.{run['id']}"]}
            again = http.post("/events/filter", json=query).raise_for_status().json()["events"]
            assert [e["id"] for e in again] == [event["id"]]
    finally:
        stop_server(server)
