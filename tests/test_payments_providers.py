"""Choosing the adapter by a payment's provider, credentials from the environment or a Prefect Secret block (never
shown), and the ledger behind the same adapter interface."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select

from adapters.db import unit_of_work
from adapters.payments.afterpay import AfterpayRefunds
from adapters.payments.base import ProviderMisconfigured, ProviderPayment, ProviderRefused, RefundStatus
from adapters.payments.paypal import PayPalRefunds
from adapters.payments.providers import LedgerRefunds, Providers, block_name
from adapters.payments.stripe import DEFAULT_API_BASE, StripeRefunds
from models.tables import GatewaySettlement, Payment
from service.steps import Pipeline

ENV = {"RETURNS_STRIPE_API_KEY": "sk_live_env_secret", "RETURNS_PAYPAL_CLIENT_ID": "pp-id",
       "RETURNS_PAYPAL_CLIENT_SECRET": "pp-env-secret", "RETURNS_AFTERPAY_MERCHANT_ID": "100101",
       "RETURNS_AFTERPAY_SECRET_KEY": "ap-env-secret", "RETURNS_PAYPAL_API_BASE": "http://127.0.0.1:9/"}


def no_secrets(name: str) -> str | None:
    return None


def test_each_provider_name_gets_its_adapter_built_once() -> None:
    providers = Providers(create_engine("sqlite://"), env=ENV, secrets=no_secrets)
    assert isinstance(providers.adapter("stripe"), StripeRefunds)
    assert isinstance(providers.adapter("paypal"), PayPalRefunds)
    assert isinstance(providers.adapter("afterpay"), AfterpayRefunds)
    assert isinstance(providers.adapter("ledger"), LedgerRefunds)
    assert isinstance(providers.adapter(None), LedgerRefunds)  # no provider recorded: the ledger
    assert providers.adapter("stripe") is providers.adapter("STRIPE")
    assert providers.adapter("stripe").api_base == DEFAULT_API_BASE  # type: ignore[attr-defined]
    assert providers.adapter("paypal").api_base == "http://127.0.0.1:9"  # type: ignore[attr-defined]


def test_an_unknown_provider_is_refused() -> None:
    with pytest.raises(ProviderRefused, match="unknown payment provider"):
        Providers(create_engine("sqlite://"), env=ENV, secrets=no_secrets).adapter("klarna")


def test_a_missing_credential_names_the_setting_and_the_block_but_no_value() -> None:
    with pytest.raises(ProviderMisconfigured) as caught:
        Providers(create_engine("sqlite://"), env={"RETURNS_PAYPAL_CLIENT_ID": "pp-id"},
                  secrets=no_secrets).adapter("paypal")
    message = str(caught.value)
    assert "RETURNS_PAYPAL_CLIENT_SECRET" in message and "returns-paypal-client-secret" in message
    assert "pp-id" not in message


def test_a_prefect_secret_block_stands_in_for_a_missing_variable() -> None:
    asked: list[str] = []

    def secrets(name: str) -> str | None:
        asked.append(name)
        return "sk_live_from_block" if name == "returns-stripe-api-key" else None

    adapter = Providers(create_engine("sqlite://"), env={}, secrets=secrets).adapter("stripe")
    assert asked == ["returns-stripe-api-key"] and block_name("RETURNS_STRIPE_API_KEY") == asked[0]
    assert "sk_live_from_block" not in repr(adapter)
    # The environment wins over a block: the block is not even asked.
    asked.clear()
    Providers(create_engine("sqlite://"), env=ENV, secrets=secrets).adapter("stripe")
    assert asked == []


def test_no_repr_shows_a_credential() -> None:
    providers = Providers(create_engine("sqlite://"), env=ENV, secrets=no_secrets)
    shown = " ".join(repr(providers.adapter(n)) for n in ("stripe", "paypal", "afterpay")) + repr(providers)
    for secret in ("sk_live_env_secret", "pp-env-secret", "ap-env-secret"):
        assert secret not in shown


def test_the_ledger_settles_once_per_key_and_reads_its_settlement_back(sample_pipeline: Pipeline) -> None:
    with unit_of_work(sample_pipeline.engine) as session:
        payment = session.scalars(select(Payment).order_by(Payment.id)).first()
        assert payment is not None and payment.id is not None
        pid = payment.id
    ledger = Providers(sample_pipeline.engine, env={}, secrets=no_secrets).adapter("ledger")
    out = ledger.refund(ProviderPayment(pid, "ledger", ""), 500, f"refund:RMA-T:{pid}", "RMA-T", "P3 return")
    assert out.status is RefundStatus.SUCCEEDED and out.amount_minor == 500
    assert ledger.refund(ProviderPayment(pid, "ledger", ""), 500, f"refund:RMA-T:{pid}", "RMA-T", "P3") == out
    assert ledger.get_refund(out.provider_ref) == out
    with unit_of_work(sample_pipeline.engine) as session:
        assert len(session.scalars(select(GatewaySettlement)).all()) == 1
    with pytest.raises(ProviderRefused):
        ledger.get_refund("ledger-999999")
