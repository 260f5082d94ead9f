"""What every payment-provider adapter offers: a refund per idempotency key, its status, and two kinds of error."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from models.errors import PermanentError, TransientError


class RefundStatus(StrEnum):
    """A refund's state at the provider (Stripe's vocabulary; the other providers' statuses map onto it)."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    REQUIRES_ACTION = "requires_action"

    @property
    def final(self) -> bool:
        """Whether the provider will not change this status any more."""
        return self in (RefundStatus.SUCCEEDED, RefundStatus.FAILED, RefundStatus.CANCELED)


@dataclass(frozen=True)
class RefundResult:
    """The provider's answer about one refund: its reference and status (amount and reason when it says them)."""

    provider_ref: str
    status: RefundStatus
    amount_minor: int | None = None
    failure_reason: str | None = None


@dataclass(frozen=True)
class ProviderPayment:
    """The captured payment a refund goes back to, as the provider knows it (no database row, no card data)."""

    payment_id: int
    provider: str
    reference: str  # Stripe payment intent (pi_) or charge (ch_), PayPal capture id, Afterpay order id
    currency: str = "USD"


class RefundAdapter(Protocol):
    """One payment provider's refunds. `key` is the provider's idempotency key: the same on every retry."""

    def refund(self, payment: ProviderPayment, amount_minor: int, key: str, merchant_reference: str,
               reason: str) -> RefundResult:
        """Refund `amount_minor` of `payment` once per `key`; a retry answers with the refund the first call made."""
        ...

    def get_refund(self, provider_ref: str) -> RefundResult:
        """The refund's current status at the provider."""
        ...


class ProviderUnavailable(TransientError):
    """Timeout, connection error, 5xx, 409 or 429: the outcome is unknown, so retry with the same key."""


class ProviderRefused(PermanentError):
    """The provider said no (4xx, 402): the same request will be refused again; a person has to look."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code


class ProviderMisconfigured(PermanentError):
    """A provider is named but its credentials are missing; the message names the setting, never its value."""


def check_amount(result: RefundResult, amount_minor: int, key: str) -> RefundResult:
    """The provider's refund for `key` must be for the amount asked: otherwise the key was used for another refund."""
    if result.amount_minor is not None and result.amount_minor != amount_minor:
        raise ProviderRefused(f"refund key {key} was already used for a refund of {result.amount_minor}, "
                              f"not {amount_minor}", code="key_reused")
    return result


def single(found: list[RefundResult], provider: str, merchant_reference: str) -> RefundResult | None:
    """The one refund a provider holds under a merchant reference, or None; several means it already paid twice."""
    if len(found) > 1:  # a person must sort that out, not a retry
        raise ProviderRefused(f"{provider} holds {len(found)} refunds for {merchant_reference}", code="duplicate")
    return found[0] if found else None
