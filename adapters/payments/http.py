"""JSON over HTTP for the providers that have no official Python package (PayPal, Afterpay), errors mapped to ours."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from adapters.payments.base import ProviderRefused, ProviderUnavailable
from models.money import from_cents, to_cents

# Reads the provider's error body: (its error code, its message).
Describe = Callable[[dict[str, Any]], tuple[str | None, str]]


def decimal_amount(amount_minor: int) -> str:
    """Minor units as the decimal string these APIs take ("12.34"); the shop's currency has cents."""
    return str(from_cents(amount_minor))


def minor_amount(value: object) -> int | None:
    """A decimal amount string from a provider's answer in minor units (None if absent or not a whole cent)."""
    try:
        return to_cents(Decimal(str(value))) if value is not None else None
    except (InvalidOperation, ValueError):
        return None


def call(client: httpx.Client, method: str, url: str, *, provider: str, describe: Describe,
         **kwargs: Any) -> dict[str, Any]:
    """One request; the JSON answer, ProviderUnavailable when the outcome is unknown, ProviderRefused on a no."""
    try:
        resp = client.request(method, url, **kwargs)
    except httpx.TransportError as exc:  # timeouts included: the provider may have acted, so retry with the same key
        raise ProviderUnavailable(f"{provider}: no answer ({type(exc).__name__}); retry with the same key") from exc
    if resp.status_code >= 500 or resp.status_code in (409, 429):
        raise ProviderUnavailable(f"{provider} answered {resp.status_code}; retry with the same key")
    try:
        body = resp.json() if resp.content else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if resp.status_code >= 400:
        code, message = describe(body)
        label = f"{resp.status_code} {code}" if code else str(resp.status_code)
        raise ProviderRefused(f"{provider} refused ({label}): {message[:300]}", status_code=resp.status_code, code=code)
    return body
