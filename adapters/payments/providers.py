"""Which adapter refunds a payment, by the provider that captured it; credentials from the environment or Prefect.

Credentials are read from `RETURNS_<PROVIDER>_...` environment variables, or else from the Prefect Secret block of
the same name in lower case with dashes (`RETURNS_STRIPE_API_KEY` -> block `returns-stripe-api-key`). Never from a
file in the repository, a flow parameter or `prefect.yaml`; no adapter's repr or error message shows them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from sqlalchemy import Engine

from adapters.db import unit_of_work
from adapters.payments.base import (
    ProviderMisconfigured,
    ProviderPayment,
    ProviderRefused,
    ProviderUnavailable,
    RefundAdapter,
    RefundResult,
    RefundStatus,
    check_amount,
)
from adapters.payments.gateway import LedgerGateway
from models.tables import GatewaySettlement

PROVIDERS = ("stripe", "paypal", "afterpay", "ledger")
LEDGER = "ledger"
WEBHOOK_SECRETS = {"stripe": "RETURNS_STRIPE_WEBHOOK_SECRET", "paypal": "RETURNS_PAYPAL_WEBHOOK_ID"}

SecretLoader = Callable[[str], str | None]


def prefect_secret(block_name: str) -> str | None:
    """The value of the Prefect Secret block `block_name`, or None when there is no such block."""
    from prefect.blocks.system import Secret

    try:
        block: Any = Secret.load(block_name)
    except ValueError:  # Prefect's answer for a block that does not exist
        return None
    except (httpx.HTTPError, OSError, RuntimeError) as exc:
        raise ProviderUnavailable(f"could not read the Prefect Secret block '{block_name}' "
                                  f"({type(exc).__name__}); is the Prefect API up?") from None
    return str(block.get())


def block_name(variable: str) -> str:
    """The Prefect Secret block that stands in for an environment variable."""
    return variable.lower().replace("_", "-")


class LedgerRefunds:
    """The ledger gateway behind the adapter interface: every refund settles at once, in our own database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._gateway = LedgerGateway(engine)

    def refund(self, payment: ProviderPayment, amount_minor: int, key: str, merchant_reference: str,
               reason: str) -> RefundResult:
        """Settle once per key (the ledger keeps no reason or reference: its book is keyed by `key`)."""
        ref = self._gateway.refund(key=key, payment_id=payment.payment_id, amount_cents=amount_minor)
        return check_amount(RefundResult(ref, RefundStatus.SUCCEEDED, amount_minor), amount_minor, key)

    def get_refund(self, provider_ref: str) -> RefundResult:
        """A ledger settlement, by the `ledger-<id>` reference its refund returned."""
        _, _, number = provider_ref.partition("ledger-")
        with unit_of_work(self.engine) as session:
            row = session.get(GatewaySettlement, int(number)) if number.isdigit() else None
            if row is None:
                raise ProviderRefused(f"the ledger has no settlement {provider_ref}", code="not_found")
            return RefundResult(provider_ref, RefundStatus.SUCCEEDED, row.amount_cents)


class Providers:
    """The adapters by provider name, each built on first use and then shared (they are thread-safe)."""

    def __init__(self, engine: Engine, env: Mapping[str, str] | None = None,
                 secrets: SecretLoader = prefect_secret, timeout: float = 30.0) -> None:
        self.engine = engine
        self._env = os.environ if env is None else env
        self._secrets = secrets
        self._timeout = timeout
        self._built: dict[str, RefundAdapter] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Providers(built={sorted(self._built)})"

    def adapter(self, provider: str | None) -> RefundAdapter:
        """The adapter for a payment's provider; no provider means the ledger."""
        name = (provider or LEDGER).lower()
        if name not in PROVIDERS:
            raise ProviderRefused(f"unknown payment provider {provider!r}", code="unknown_provider")
        with self._lock:
            if name not in self._built:
                self._built[name] = self._build(name)
            return self._built[name]

    def _build(self, name: str) -> RefundAdapter:
        if name == "stripe":
            from adapters.payments.stripe import StripeRefunds

            return StripeRefunds(self._credential("RETURNS_STRIPE_API_KEY"), self._setting("RETURNS_STRIPE_API_BASE"),
                                 timeout=self._timeout)
        if name == "paypal":
            from adapters.payments.paypal import PayPalRefunds

            return PayPalRefunds(self._credential("RETURNS_PAYPAL_CLIENT_ID"),
                                 self._credential("RETURNS_PAYPAL_CLIENT_SECRET"),
                                 self._setting("RETURNS_PAYPAL_API_BASE"), timeout=self._timeout)
        if name == "afterpay":
            from adapters.payments.afterpay import AfterpayRefunds

            return AfterpayRefunds(self._credential("RETURNS_AFTERPAY_MERCHANT_ID"),
                                   self._credential("RETURNS_AFTERPAY_SECRET_KEY"),
                                   self._setting("RETURNS_AFTERPAY_API_BASE"))
        return LedgerRefunds(self.engine)

    def webhook_secret(self, provider: str) -> str | None:
        """What checks `provider`'s webhook calls (Stripe's signing secret, PayPal's webhook id); None: not set up."""
        variable = WEBHOOK_SECRETS.get(provider)
        return self._lookup(variable) if variable else None

    def _setting(self, variable: str) -> str | None:
        return self._env.get(variable) or None

    def _lookup(self, variable: str) -> str | None:
        """The environment's value, else the Prefect Secret block's; None when neither has one."""
        return self._env.get(variable) or self._secrets(block_name(variable)) or None

    def _credential(self, variable: str) -> str:
        value = self._lookup(variable)
        if not value:
            raise ProviderMisconfigured(f"set {variable} or the Prefect Secret block '{block_name(variable)}'")
        return value
