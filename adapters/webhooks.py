"""Webhooks out: sign a body (HMAC-SHA256 over `<timestamp>.<body>`) and POST it to a storefront's endpoint."""

from __future__ import annotations

import hashlib
import hmac
import secrets

import httpx

from models.errors import TransientError

SIGNATURE_HEADER = "Returns-Signature"
TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class DeliveryFailed(TransientError):
    """The endpoint did not answer 2xx (or not at all); the relay retries with backoff."""


def new_secret() -> str:
    """A signing secret: 256 random bits, shown to the operator once."""
    return "whsec_" + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Returns-Signature` value: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, now: int, tolerance: int = 300) -> bool:
    """What a receiver does: the header's MAC matches and its timestamp is within `tolerance` seconds of `now`."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def post(url: str, secret: str, body: bytes, event_id: str, timestamp: int) -> int:
    """POST one signed delivery; the status on 2xx, DeliveryFailed otherwise (never follows redirects)."""
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(secret, timestamp, body),
               "Returns-Event-Id": event_id, "User-Agent": "returns-pipeline-webhooks/1"}
    try:
        r = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise DeliveryFailed(f"{type(exc).__name__} posting to the endpoint") from None
    if not 200 <= r.status_code < 300:
        raise DeliveryFailed(f"the endpoint answered HTTP {r.status_code}")
    return r.status_code
