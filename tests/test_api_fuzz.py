"""A schemathesis run over /openapi.json against the running API (uvicorn on loopback, the sample loaded, a valid
key): for every operation and generated input, no 5xx, and every response matches its documented status, content
type, headers and schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from conftest import make_pipeline
from helpers import free_port
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from adapters.clock import utcnow
from adapters.payments.providers import Providers
from entrypoints.api.app import create_app
from entrypoints.api.config import ApiConfig
from entrypoints.api.serve import api_thread
from entrypoints.demo import shifted_catalog
from models.schemas import ImportIn, parse

pytestmark = pytest.mark.slow
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
KEY: dict[str, str] = {}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    base: Path = tmp_path_factory.mktemp("fuzz")
    pipeline = make_pipeline(base / "home", f"sqlite:///{base / 'returns.db'}")
    pipeline.import_data(parse(ImportIn, shifted_catalog(utcnow())))
    KEY["key"] = pipeline.create_api_key("fuzz", utcnow())
    # The providers' webhooks set up, so the fuzzer's calls meet the signature checks (no Prefect for secrets here).
    pipeline.providers = Providers(pipeline.engine, env={
        "RETURNS_STRIPE_WEBHOOK_SECRET": "whsec_fuzz", "RETURNS_PAYPAL_WEBHOOK_ID": "FUZZ",
        "RETURNS_PAYPAL_CLIENT_ID": "fuzz", "RETURNS_PAYPAL_CLIENT_SECRET": "fuzz"}, secrets=lambda name: None)
    # Limits high enough that the fuzzer measures the handlers, not the rate limiter (tested on its own).
    config = ApiConfig(secret=b"fuzz", key_rate=10_000, address_rate=10_000, wait_seconds=2)
    with api_thread(create_app(pipeline, config=config), "127.0.0.1", free_port()) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_no_5xx_and_every_response_matches_the_document(api_schema: schemathesis.BaseSchema) -> None:
    """Each operation gets its own run of generated cases (schemathesis's pytest loader does not work with this
    pytest, so the operations are walked here)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY['key']}"}, checks=CHECKS)

        fuzz()
