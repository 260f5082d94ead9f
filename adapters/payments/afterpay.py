"""Afterpay refunds (Online API v2): our key is the refund's requestId, sent with its merchantReference."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from adapters.payments.base import (
    ProviderPayment,
    ProviderRefused,
    RefundResult,
    RefundStatus,
    check_amount,
    single,
)
from adapters.payments.http import call, decimal_amount, minor_amount

DEFAULT_API_BASE = "https://global-api.afterpay.com"
USER_AGENT = "returns-pipeline/0.1.0 (Python; httpx)"  # Afterpay requires a User-Agent naming the integration


class AfterpayRefunds:
    """Refunds of Afterpay orders. A created refund is complete (Afterpay answers with its refundedAt)."""

    def __init__(self, merchant_id: str, secret_key: str, api_base: str | None = None, *,
                 timeout: float = 70.0) -> None:
        # 70 s: Afterpay's documented read timeout for Create Refund, which waits on banking networks.
        self.api_base = (api_base or DEFAULT_API_BASE).rstrip("/")
        self._http = httpx.Client(base_url=self.api_base, timeout=httpx.Timeout(timeout, connect=10.0),
                                  auth=(merchant_id, secret_key),
                                  headers={"User-Agent": USER_AGENT, "Accept": "application/json"})

    def __repr__(self) -> str:
        return f"AfterpayRefunds(api_base={self.api_base!r})"  # never the credentials

    def refund(self, payment: ProviderPayment, amount_minor: int, key: str, merchant_reference: str,
               reason: str) -> RefundResult:
        """Look for a refund already made under `merchant_reference`, else create one with `key` as requestId."""
        # Afterpay answers a repeated requestId with the same response for up to 24 hours only; after that the same
        # request would refund again, and this adapter cannot tell a first call from a late retry: it looks first.
        existing = self._find(payment, merchant_reference)
        if existing is not None:
            return check_amount(existing, amount_minor, key)
        body = {"requestId": key[:64], "amount": {"amount": decimal_amount(amount_minor), "currency": payment.currency},
                "merchantReference": merchant_reference[:85], "refundMerchantReference": merchant_reference[:128]}
        data = call(self._http, "POST", f"/v2/payments/{quote(payment.reference, safe='')}/refund",
                    provider="Afterpay", describe=_describe, json=body)
        return check_amount(_result(payment.reference, data), amount_minor, key)

    def get_refund(self, provider_ref: str) -> RefundResult:
        """The refund, read back from its order's payment (`provider_ref` is `<order id>/<refund id>`)."""
        order_id, _, refund_id = provider_ref.rpartition("/")
        for item in self._refunds(order_id):
            if str(item.get("refundId")) == refund_id:
                return _result(order_id, item)
        raise ProviderRefused(f"Afterpay has no refund {provider_ref}", code="not_found")

    def refunds_of(self, payment: ProviderPayment) -> list[tuple[str | None, RefundResult]]:
        """Every refund Afterpay holds for the order, with its merchant reference."""
        return [(item.get("merchantReference"), _result(payment.reference, item))
                for item in self._refunds(payment.reference)]

    def _refunds(self, order_id: str) -> list[dict[str, Any]]:
        data = call(self._http, "GET", f"/v2/payments/{quote(order_id, safe='')}", provider="Afterpay",
                    describe=_describe)
        refunds = data.get("refunds") or []
        return [r for r in refunds if isinstance(r, dict)]

    def _find(self, payment: ProviderPayment, merchant_reference: str) -> RefundResult | None:
        return single([res for ref, res in self.refunds_of(payment) if ref == merchant_reference], "Afterpay",
                      merchant_reference)


def _result(order_id: str, data: dict[str, Any]) -> RefundResult:
    if not data.get("refundId"):
        raise ProviderRefused("Afterpay answered without a refund id", code="malformed")
    status = RefundStatus.SUCCEEDED if data.get("refundedAt") else RefundStatus.PENDING
    return RefundResult(provider_ref=f"{order_id}/{data['refundId']}", status=status,
                        amount_minor=minor_amount((data.get("amount") or {}).get("amount")))


def _describe(body: dict[str, Any]) -> tuple[str | None, str]:
    """Afterpay's error: its errorCode and message."""
    code = body.get("errorCode")
    return (str(code) if code else None), str(body.get("message") or "")
