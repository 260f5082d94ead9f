"""The refund-reconciliation flow under Prefect's engine: its table artifact, and a failed run when refunds differ."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flows.reconcile as fr
from adapters.payments.providers import Providers
from service.steps import Pipeline
from tests.conftest import make_pipeline
from tests.fake_providers import FakeStripe, serve
from tests.test_payments_pipeline import Shop, ask_and_receive, buy, payment

pytestmark = pytest.mark.prefect


@pytest.fixture
def shop(prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    stripe = FakeStripe()
    with serve(stripe) as url:
        base = make_pipeline(tmp_path / "home", f"sqlite:///{tmp_path / 'returns.db'}")
        providers = Providers(base.engine, env={"RETURNS_STRIPE_API_KEY": stripe.api_key,
                                                "RETURNS_STRIPE_API_BASE": url}, secrets=lambda name: None)
        p = Pipeline(settings=base.settings, engine=base.engine, providers=providers)
        monkeypatch.setattr(fr, "pipeline", lambda: p)
        yield Shop(p, stripe, None, None)  # type: ignore[arg-type]  # this module needs Stripe only


def artifact(key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[0] if found else None


def test_matching_refunds_complete_the_run_and_a_difference_fails_it_with_the_table(shop: Shop) -> None:
    ch = shop.stripe.add_payment(10700)
    buy(shop, "PAY-F1", payment(provider="stripe", reference=ch.intent))
    ask_and_receive(shop, "PAY-F1")
    state = fr.refund_reconciliation(return_state=True)
    assert state.is_completed(), state.message
    ref = next(iter(shop.stripe.refunds))
    shop.stripe.settle(ref, "failed", "lost_or_stolen_card")
    state = fr.refund_reconciliation(return_state=True)
    assert state.is_failed() and "1 refund(s) differ" in str(state.message)
    art = artifact(fr.REPORT)
    assert art is not None and art.type == "table"
    assert ref in str(art.data) and "status differs" in str(art.data) and "@" not in str(art.data)
