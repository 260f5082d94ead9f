"""Shared fixtures: an isolated PREFECT_HOME, real SQLite and PostgreSQL databases, a ready pipeline."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

# Prefect reads its settings at import: isolate it before anything imports prefect.
_PREFECT_HOME = tempfile.mkdtemp(prefix="returns-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from adapters.config import load_settings  # noqa: E402
from adapters.db import engine_for, upgrade  # noqa: E402
from service.steps import Pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample"
PG_ADMIN_URL = os.environ.get("RETURNS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_available() -> bool:
    try:
        with create_engine(PG_ADMIN_URL).connect() as conn:
            conn.execute(text("select 1"))
        return True
    except Exception:  # noqa: BLE001
        return False


PG_AVAILABLE = _pg_available()


def pg_schema_url(schema: str) -> str:
    """A URL whose connections default to `schema`, so each test run has a private, droppable namespace."""
    return f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"


def require_postgres() -> None:
    """Skip the test without PostgreSQL on 127.0.0.1:5432; in CI, which must have it, fail it instead."""
    if not PG_AVAILABLE:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432")
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL schema (dropped afterwards). CI must have PostgreSQL: it never skips there."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield pg_schema_url(schema)
    finally:
        engine_for.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'returns.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each database test runs on SQLite and on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'returns.db'}"
    return str(request.getfixturevalue("pg_url"))


def make_pipeline(home: Path, url: str) -> Pipeline:
    """A pipeline over a migrated database at `url`, with runtime files under `home`."""
    upgrade(url)
    settings = load_settings({"RETURNS_HOME": str(home), "RETURNS_DATABASE_URL": url})
    return Pipeline(settings=settings, engine=engine_for(url))


@pytest.fixture
def pipeline(tmp_path: Path, db_url: str) -> Pipeline:
    """A migrated, empty pipeline on each backend."""
    return make_pipeline(tmp_path / "home", db_url)


@pytest.fixture
def sample_pipeline(pipeline: Pipeline) -> Pipeline:
    """The pipeline with the sample catalogue, customers and orders imported."""
    from models.schemas import ImportIn, parse

    pipeline.import_data(parse(ImportIn, (SAMPLE / "catalog.json").read_text(encoding="utf-8")))
    return pipeline


@pytest.fixture(scope="module")
def localstripe() -> Iterator[str]:
    """A localstripe server for the module (tests/helpers.py starts it on loopback)."""
    from tests.helpers import localstripe_server

    with localstripe_server() as url:
        yield url


@pytest.fixture(scope="session", autouse=True)
def _write_tallies() -> Iterator[None]:
    """The counts docs/reliability.md reports come from a real run: RETURNS_TALLY_DIR=<dir> writes them."""
    yield
    out = os.environ.get("RETURNS_TALLY_DIR")
    if out:
        from tests.helpers import TALLIES

        Path(out).mkdir(parents=True, exist_ok=True)
        for suite, counts in TALLIES.items():
            (Path(out) / f"{suite}.json").write_text(json.dumps(dict(sorted(counts.items())), indent=1), "utf-8")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """The session's one temporary Prefect API (~9 s to start); heartbeats off so a flow costs ~0.1 s, and the
    server stores events every 0.2 s instead of 5 s, so a test sees a return's events without a long wait."""
    # It lives here, not in a test module: a fixture imported into another module is a second definition with its
    # own session cache, so each importer started its own harness. Prefect's events worker is one per process
    # whatever the API URL, so a later harness's task-run events went to an earlier one's server and were lost.
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    # The harness passes the current settings to the server it starts: set the flush interval first.
    with temporary_settings({PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL: 0.2}), prefect_test_harness(), \
            temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
