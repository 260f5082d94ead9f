"""PayPal refunds of captured payments (Payments v2, the Orders v2 integration); our key is PayPal-Request-Id."""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import quote

import httpx

from adapters.payments.base import (
    ProviderPayment,
    ProviderRefused,
    RefundResult,
    RefundStatus,
    check_amount,
)
from adapters.payments.http import call, decimal_amount, minor_amount

DEFAULT_API_BASE = "https://api-m.paypal.com"
STATUSES = {"COMPLETED": RefundStatus.SUCCEEDED, "PENDING": RefundStatus.PENDING, "FAILED": RefundStatus.FAILED,
            "CANCELLED": RefundStatus.CANCELED}


class PayPalRefunds:
    """Refunds of PayPal captures, with an OAuth2 client-credentials token kept until shortly before it expires."""

    def __init__(self, client_id: str, client_secret: str, api_base: str | None = None, *,
                 timeout: float = 30.0) -> None:
        self.api_base = (api_base or DEFAULT_API_BASE).rstrip("/")
        self._auth = (client_id, client_secret)
        self._http = httpx.Client(base_url=self.api_base, timeout=timeout)
        self._token: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PayPalRefunds(api_base={self.api_base!r})"  # never the credentials

    def refund(self, payment: ProviderPayment, amount_minor: int, key: str, merchant_reference: str,
               reason: str) -> RefundResult:
        """Refund part of a capture. PayPal keeps a PayPal-Request-Id for 45 days and answers a repeat with the
        latest state of the refund the first request made, so a retry pays nothing more."""
        body = {"amount": {"value": decimal_amount(amount_minor), "currency_code": payment.currency},
                "custom_id": merchant_reference[:127], "note_to_payer": reason[:255]}
        data = self._authorized("POST", f"/v2/payments/captures/{quote(payment.reference, safe='')}/refund", json=body,
                                headers={"PayPal-Request-Id": key, "Prefer": "return=representation"})
        # Whatever PayPal does with a reused id and another body, a refund of another amount is not ours.
        return check_amount(_result(data), amount_minor, key)

    def get_refund(self, provider_ref: str) -> RefundResult:
        """The refund's current status (an eCheck-funded refund stays PENDING until it clears)."""
        return _result(self._authorized("GET", f"/v2/payments/refunds/{quote(provider_ref, safe='')}"))

    def verify_webhook(self, verification: dict[str, Any]) -> bool:
        """Whether PayPal's verify-webhook-signature API answers SUCCESS for a delivery's headers and event."""
        data = self._authorized("POST", "/v1/notifications/verify-webhook-signature", json=verification)
        return data.get("verification_status") == "SUCCESS"

    def _authorized(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        headers = dict(kwargs.pop("headers", {}))
        for attempt in (1, 2):
            headers["Authorization"] = f"Bearer {self._access_token(renew=attempt == 2)}"
            try:
                return call(self._http, method, path, provider="PayPal", describe=_describe, headers=headers, **kwargs)
            except ProviderRefused as exc:
                if exc.status_code != 401 or attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _access_token(self, renew: bool = False) -> str:
        with self._lock:
            if renew or self._token is None or self._token[1] <= time.monotonic():
                data = call(self._http, "POST", "/v1/oauth2/token", provider="PayPal", describe=_describe,
                            auth=self._auth, data={"grant_type": "client_credentials"})
                lifetime = float(data.get("expires_in", 0))
                # Renewed a minute early so a request never leaves with a token about to lapse.
                self._token = (str(data["access_token"]), time.monotonic() + max(lifetime - 60, 0))
            return self._token[0]


def _result(data: dict[str, Any]) -> RefundResult:
    if "id" not in data:
        raise ProviderRefused("PayPal answered without a refund id", code="malformed")
    details = data.get("status_details") or {}
    status = STATUSES.get(str(data.get("status")), RefundStatus.PENDING)  # unknown: not money we may call settled
    return RefundResult(provider_ref=str(data["id"]), status=status,
                        amount_minor=minor_amount((data.get("amount") or {}).get("value")),
                        failure_reason=details.get("reason"))


def _describe(body: dict[str, Any]) -> tuple[str | None, str]:
    """PayPal's error: its name, and the first detail's issue and description when there is one."""
    details = body.get("details") or [{}]
    first = details[0] if isinstance(details, list) and details and isinstance(details[0], dict) else {}
    code = first.get("issue") or body.get("name") or body.get("error")
    message = first.get("description") or body.get("message") or body.get("error_description") or ""
    return (str(code) if code else None), str(message)
