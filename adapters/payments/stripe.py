"""Stripe refunds through the official `stripe` package; our refund key is Stripe's Idempotency-Key."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import stripe

from adapters.payments.base import (
    ProviderPayment,
    ProviderRefused,
    ProviderUnavailable,
    RefundResult,
    RefundStatus,
    check_amount,
    single,
)

DEFAULT_API_BASE = stripe.DEFAULT_API_BASE
METADATA_REFERENCE = "merchant_reference"


class StripeRefunds:
    """Refunds of Stripe payment intents (pi_...) and charges (ch_..., py_...)."""

    def __init__(self, api_key: str, api_base: str | None = None, *, timeout: float = 30.0,
                 max_network_retries: int = 2) -> None:
        self.api_base = api_base or DEFAULT_API_BASE
        # The SDK's own network retries resend the same Idempotency-Key, so they are safe; the pipeline's task
        # retries do the same one level up.
        self._client = stripe.StripeClient(api_key, base_addresses={"api": self.api_base},
                                           max_network_retries=max_network_retries,
                                           http_client=stripe.RequestsClient(timeout=timeout))

    def __repr__(self) -> str:
        return f"StripeRefunds(api_base={self.api_base!r})"  # never the key

    def refund(self, payment: ProviderPayment, amount_minor: int, key: str, merchant_reference: str,
               reason: str) -> RefundResult:
        """Look for a refund already made under `merchant_reference`, else create one with `key` as Idempotency-Key."""
        target = _target(payment.reference)
        # Stripe prunes idempotency keys once they are 24 hours old, and then the same key makes a second refund.
        # This adapter cannot tell a first call from a retry days later, so it always looks first.
        existing = self._find(payment, merchant_reference)
        if existing is not None:
            return check_amount(existing, amount_minor, key)
        # Our reason is free text; Stripe's `reason` parameter is an enum for fraud and duplicates, so the text
        # travels in metadata beside the merchant reference the lookup above searches for.
        params: dict[str, Any] = {**target, "amount": amount_minor,
                                  "metadata": {METADATA_REFERENCE: merchant_reference, "reason": reason[:500]}}
        with _mapped("refund"):
            created = self._client.v1.refunds.create(params=params, options={"idempotency_key": key})  # type: ignore[arg-type]
        return check_amount(_result(created.to_dict()), amount_minor, key)

    def get_refund(self, provider_ref: str) -> RefundResult:
        """The refund's current status (pending refunds move to succeeded or failed at Stripe's pace)."""
        with _mapped("refund lookup"):
            return _result(self._client.v1.refunds.retrieve(provider_ref).to_dict())

    def refunds_of(self, payment: ProviderPayment) -> list[tuple[str | None, RefundResult]]:
        """Every refund Stripe holds for the payment, with the merchant reference we put in its metadata."""
        with _mapped("refund list"):
            page = self._client.v1.refunds.list(params={**_target(payment.reference), "limit": 100})  # type: ignore[arg-type]
            rows = [r.to_dict() for r in page.auto_paging_iter()]
        return [((r.get("metadata") or {}).get(METADATA_REFERENCE), _result(r)) for r in rows]

    def _find(self, payment: ProviderPayment, merchant_reference: str) -> RefundResult | None:
        return single([res for ref, res in self.refunds_of(payment) if ref == merchant_reference], "Stripe",
                      merchant_reference)


def _target(reference: str) -> dict[str, str]:
    if reference.startswith("pi_"):
        return {"payment_intent": reference}
    if reference.startswith(("ch_", "py_")):
        return {"charge": reference}
    raise ProviderRefused(f"{reference!r} is not a Stripe payment intent or charge", code="bad_reference")


def _result(refund: dict[str, Any]) -> RefundResult:
    try:
        status = RefundStatus(str(refund.get("status")))
    except ValueError:
        status = RefundStatus.PENDING  # a status this code does not know yet is not money we may call settled
    return RefundResult(provider_ref=str(refund["id"]), status=status, amount_minor=refund.get("amount"),
                        failure_reason=refund.get("failure_reason"))


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Stripe's errors as ours: unknown outcomes are retryable, refusals are permanent."""
    try:
        yield
    except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
        raise ProviderUnavailable(f"Stripe {what}: no answer ({type(exc).__name__}); retry with the same key") from exc
    except stripe.StripeError as exc:
        status = exc.http_status
        if status is None or status >= 500 or status == 409:
            raise ProviderUnavailable(f"Stripe {what}: {status} {exc.user_message or ''}".rstrip()) from exc
        raise ProviderRefused(f"Stripe refused the {what} ({status} {exc.code or type(exc).__name__}): "
                              f"{exc.user_message or ''}".rstrip(), status_code=status, code=exc.code) from exc
