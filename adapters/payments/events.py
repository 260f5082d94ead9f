"""Payment providers' webhook events, verified: Stripe's `Stripe-Signature` (HMAC-SHA256 over timestamp and body,
checked by the official package) and PayPal's transmission signature (checked by PayPal's own verify API).

An event is only a hint: the pipeline asks the provider about the refund it names before it acts, so a verified
but stale or reordered event can never complete a return by itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import stripe

from adapters.payments.paypal import PayPalRefunds


class Unverified(Exception):
    """The call is not a verified event of the provider (no signature, a wrong one, an old one, not JSON)."""


@dataclass(frozen=True)
class ProviderEvent:
    """A verified event: its id (what a redelivery repeats), type, and the refund it is about (if any)."""

    provider: str
    event_id: str
    type: str
    refund_ref: str | None = None
    merchant_reference: str | None = None  # ours, set on the refund when we asked for it


def stripe_event(payload: bytes, signature: str | None, secret: str, tolerance: int = 300) -> ProviderEvent:
    """The event in `payload` if `signature` is Stripe's for it under `secret` and at most `tolerance` s old."""
    if not signature:
        raise Unverified("no Stripe-Signature header")
    try:
        stripe.WebhookSignature.verify_header(payload.decode("utf-8"), signature, secret, tolerance)
        data = json.loads(payload)
    except (stripe.SignatureVerificationError, UnicodeDecodeError, ValueError) as exc:
        raise Unverified(f"the Stripe signature does not verify ({type(exc).__name__})") from None
    event_id, kind = _text(data, "id"), _text(data, "type")
    obj = data.get("data", {}).get("object", {}) if isinstance(data.get("data"), dict) else {}
    if not isinstance(obj, dict) or obj.get("object") != "refund":
        return ProviderEvent("stripe", event_id, kind)
    metadata = obj.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    return ProviderEvent("stripe", event_id, kind, _optional(obj, "id"), _optional(metadata, "merchant_reference"))


PAYPAL_HEADERS = {"auth_algo": "paypal-auth-algo", "cert_url": "paypal-cert-url",
                  "transmission_id": "paypal-transmission-id", "transmission_sig": "paypal-transmission-sig",
                  "transmission_time": "paypal-transmission-time"}


def paypal_event(payload: bytes, headers: Mapping[str, str], webhook_id: str, paypal: PayPalRefunds) -> ProviderEvent:
    """The event in `payload` if PayPal's verify API says its transmission headers are PayPal's for `webhook_id`."""
    signed = {field: headers.get(name, "") for field, name in PAYPAL_HEADERS.items()}
    if not all(signed.values()):
        raise Unverified("no PayPal transmission signature headers")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise Unverified("the PayPal event is not JSON") from None
    if not isinstance(data, dict) or not paypal.verify_webhook(signed | {"webhook_id": webhook_id,
                                                                         "webhook_event": data}):
        raise Unverified("PayPal does not verify the transmission signature")
    event_id, kind = _text(data, "id"), _text(data, "event_type")
    resource = data.get("resource")
    if data.get("resource_type") != "refund" or not isinstance(resource, dict):
        return ProviderEvent("paypal", event_id, kind)
    return ProviderEvent("paypal", event_id, kind, _optional(resource, "id"), _optional(resource, "custom_id"))


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= 80:
        raise Unverified(f"the event has no usable {key!r}")
    return value


def _optional(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and 0 < len(value) <= 80 else None
