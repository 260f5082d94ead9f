"""Loopback fakes of Stripe's, PayPal's and Afterpay's refund APIs, following their documented contracts, for the
cases a real test server cannot show: idempotent replays, pruned keys, pending refunds that settle later, refusals,
5xx, and a provider that acts and then never answers.

Each fake is a small HTTP server on 127.0.0.1 in a thread. Its state is plain dicts a test can read; `faults` is
a queue a test fills: the next create request meets the fault at its head.

- "unavailable": 503 before anything is done (nothing saved under the key).
- "stall": the refund is made and its response saved, then the answer is held back until the fake stops (the
  client's timeout fires first: the provider paid and we do not know).
- "drop": the refund is made and saved, then the connection is closed with no answer.
- "conflict": 409 before anything is done (Afterpay: the same request is still being processed).
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from models.money import from_cents, to_cents


@dataclass
class Reply:
    """An answer a fake gives: status, JSON body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    """What a fake received (headers lower-cased), for the tests' assertions."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class Fake:
    """The common part: a fault queue, the requests seen, a lock around state, a handler per request."""

    def __init__(self) -> None:
        self.faults: list[str] = []
        self.requests: list[Request] = []
        self.lock = threading.RLock()
        self.released = threading.Event()
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def take_fault(self) -> str | None:
        with self.lock:
            return self.faults.pop(0) if self.faults else None

    def creates(self, suffix: str) -> list[Request]:
        """The POST requests whose path ends with `suffix`."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith(suffix)]

    def handle(self, req: Request, query: dict[str, str]) -> Reply:  # pragma: no cover - each fake has its own
        raise NotImplementedError


# ---- Stripe ------------------------------------------------------------------------------------------------------


@dataclass
class StripeCharge:
    intent: str
    charge: str
    amount: int
    refund_status: str = "succeeded"  # what a new refund starts as ("pending" for slow payment methods)
    refuse: tuple[int, str, str] | None = None  # (HTTP status, error type, code) for every refund of it


class FakeStripe(Fake):
    """Stripe v1 refunds: the first response per Idempotency-Key is saved once execution begins (errors included);
    the same key with the same parameters replays it, with other parameters it is an idempotency_error. Invalid
    parameters fail before execution, so nothing is saved for them. Keys are pruned when a test says a day passed."""

    def __init__(self, api_key: str = "sk_test_fake") -> None:
        super().__init__()
        self.api_key = api_key
        self.charges: dict[str, StripeCharge] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.saved: dict[str, tuple[dict[str, Any], Reply]] = {}

    def add_payment(self, amount: int, **kw: Any) -> StripeCharge:
        n = self.next_id()
        ch = StripeCharge(intent=f"pi_fake{n}", charge=f"ch_fake{n}", amount=amount, **kw)
        self.charges[ch.intent] = ch
        return ch

    def prune_keys(self) -> None:
        """24 hours passed: Stripe forgets every idempotency key."""
        with self.lock:
            self.saved.clear()

    def settle(self, refund_id: str, status: str, failure_reason: str | None = None) -> None:
        """A pending refund succeeds, fails or is canceled (the bank's answer, days later)."""
        with self.lock:
            self.refunds[refund_id].update(status=status, failure_reason=failure_reason)

    def refunded(self, ch: StripeCharge) -> int:
        """What is refunded (or on its way) of a charge: failed and canceled refunds gave the money back."""
        return sum(r["amount"] for r in self.refunds.values()
                   if r["charge"] == ch.charge and r["status"] not in ("failed", "canceled"))

    def handle(self, req: Request, query: dict[str, str]) -> Reply:
        if req.headers.get("authorization") != f"Bearer {self.api_key}":
            return Reply(401, _stripe_error("invalid_request_error", None, "Invalid API Key provided"))
        if req.method == "POST" and req.path == "/v1/refunds":
            return self._create(req)
        if req.method == "GET" and req.path == "/v1/refunds":
            return self._list(query)
        if req.method == "GET" and req.path.startswith("/v1/refunds/"):
            refund = self.refunds.get(req.path.rsplit("/", 1)[1])
            return Reply(200, dict(refund)) if refund else Reply(404, _stripe_error(
                "invalid_request_error", "resource_missing", "No such refund"))
        return Reply(404, _stripe_error("invalid_request_error", None, "Unrecognized request URL"))

    def _create(self, req: Request) -> Reply:
        key = req.headers.get("idempotency-key")
        params = req.body
        if key and key in self.saved:
            first, reply = self.saved[key]
            if first != params:
                return Reply(400, _stripe_error("idempotency_error", None, "Keys for idempotent requests can only be "
                                                "used with the same parameters they were first used with."))
            return Reply(reply.status, reply.body, {"Idempotent-Replayed": "true"})
        ch = self.charges.get(params.get("payment_intent", "")) or next(
            (c for c in self.charges.values() if c.charge == params.get("charge")), None)
        if ch is None:  # validation: fails before execution begins, nothing saved
            return Reply(404, _stripe_error("invalid_request_error", "resource_missing", "No such payment_intent"))
        amount = int(params.get("amount", ch.amount - self.refunded(ch)))
        # Execution begins: from here on the response is saved under the key, whatever it is.
        if ch.refuse is not None:
            status, kind, code = ch.refuse
            reply = Reply(status, _stripe_error(kind, code, "The refund was declined."))
        elif amount > ch.amount - self.refunded(ch):
            reply = Reply(400, _stripe_error("invalid_request_error", "charge_already_refunded" if
                                             self.refunded(ch) >= ch.amount else None,
                                             f"Refund amount ({amount}) is greater than unrefunded amount on charge "
                                             f"({ch.amount - self.refunded(ch)})"))
        else:
            refund = {"id": f"re_fake{self.next_id()}", "object": "refund", "amount": amount, "currency": "usd",
                      "charge": ch.charge, "payment_intent": ch.intent, "status": ch.refund_status,
                      "failure_reason": None, "metadata": params.get("metadata", {})}
            self.refunds[refund["id"]] = refund
            reply = Reply(200, dict(refund))
        if key:
            self.saved[key] = (params, reply)
        return reply

    def _list(self, query: dict[str, str]) -> Reply:
        ch = self.charges.get(query.get("payment_intent", "")) or next(
            (c for c in self.charges.values() if c.charge == query.get("charge")), None)
        rows = [dict(r) for r in reversed(self.refunds.values()) if ch is None or r["charge"] == ch.charge]
        return Reply(200, {"object": "list", "url": "/v1/refunds", "has_more": False, "data": rows})


def _stripe_error(kind: str, code: str | None, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "code": code, "message": message}}


# ---- PayPal ------------------------------------------------------------------------------------------------------


@dataclass
class PayPalCapture:
    id: str
    amount: int
    refund_status: str = "COMPLETED"  # "PENDING" for an eCheck-funded payment


class FakePayPal(Fake):
    """PayPal Payments v2: OAuth2 client credentials; POST /v2/payments/captures/{id}/refund with PayPal-Request-Id
    (a repeat answers with the latest state of the refund the first request made); GET /v2/payments/refunds/{id}."""

    def __init__(self, client_id: str = "paypal-client", client_secret: str = "paypal-secret") -> None:
        super().__init__()
        self.credentials = (client_id, client_secret)
        self.captures: dict[str, PayPalCapture] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.by_request_id: dict[str, str] = {}
        self.tokens: set[str] = set()
        self.tokens_issued = 0
        self.transmissions: dict[str, tuple[str, str, dict[str, Any]]] = {}  # id -> (signature, webhook id, event)

    def add_capture(self, amount: int, **kw: Any) -> PayPalCapture:
        cap = PayPalCapture(id=f"CAP{self.next_id():06d}", amount=amount, **kw)
        self.captures[cap.id] = cap
        return cap

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    def settle(self, refund_id: str, status: str) -> None:
        with self.lock:
            self.refunds[refund_id]["status"] = status
            self.refunds[refund_id].pop("status_details", None)

    def transmit(self, event: dict[str, Any], webhook_id: str) -> dict[str, str]:
        """The headers PayPal sends with a delivery of `event` to `webhook_id` (its verify API knows them)."""
        n = self.next_id()
        tid, sig = f"tx-{n:06d}", f"sig{n:06d}{secrets.token_hex(16)}"
        self.transmissions[tid] = (sig, webhook_id, event)
        return {"PAYPAL-AUTH-ALGO": "SHA256withRSA", "PAYPAL-CERT-URL": "https://api.paypal.com/v1/notifications/"
                "certs/CERT-fake", "PAYPAL-TRANSMISSION-ID": tid, "PAYPAL-TRANSMISSION-SIG": sig,
                "PAYPAL-TRANSMISSION-TIME": "2026-12-03T10:00:00Z"}

    def refunded(self, cap: PayPalCapture) -> int:
        return sum(r["_cents"] for r in self.refunds.values()
                   if r["_capture"] == cap.id and r["status"] not in ("FAILED", "CANCELLED"))

    def handle(self, req: Request, query: dict[str, str]) -> Reply:
        if req.path == "/v1/oauth2/token" and req.method == "POST":
            if _basic(req) != self.credentials or req.body.get("grant_type") != "client_credentials":
                return Reply(401, {"error": "invalid_client", "error_description": "Client Authentication failed"})
            self.tokens_issued += 1
            token = f"A21AA-fake-{self.tokens_issued}"
            self.tokens.add(token)
            return Reply(200, {"access_token": token, "token_type": "Bearer", "expires_in": 32400})
        if req.headers.get("authorization", "").removeprefix("Bearer ") not in self.tokens:
            return Reply(401, {"error": "invalid_token", "error_description": "Token signature verification failed"})
        parts = req.path.strip("/").split("/")
        if req.method == "POST" and req.path == "/v1/notifications/verify-webhook-signature":
            known = self.transmissions.get(str(req.body.get("transmission_id")))
            ok = known is not None and (req.body.get("transmission_sig"), req.body.get("webhook_id"),
                                        req.body.get("webhook_event")) == known
            return Reply(200, {"verification_status": "SUCCESS" if ok else "FAILURE"})
        if req.method == "POST" and len(parts) == 5 and parts[:3] == ["v2", "payments", "captures"] \
                and parts[4] == "refund":
            return self._create(req, parts[3])
        if req.method == "GET" and parts[:3] == ["v2", "payments", "refunds"] and len(parts) == 4:
            refund = self.refunds.get(parts[3])
            return Reply(200, _public(refund)) if refund else Reply(404, _paypal_error(
                "RESOURCE_NOT_FOUND", "INVALID_RESOURCE_ID", "Specified resource ID does not exist."))
        return Reply(404, _paypal_error("NOT_FOUND", None, "The requested resource was not found"))

    def _create(self, req: Request, capture_id: str) -> Reply:
        request_id = req.headers.get("paypal-request-id")
        if request_id and request_id in self.by_request_id:
            return Reply(200, _public(self.refunds[self.by_request_id[request_id]]))
        cap = self.captures.get(capture_id)
        if cap is None:
            return Reply(404, _paypal_error("RESOURCE_NOT_FOUND", "INVALID_RESOURCE_ID",
                                            "Specified resource ID does not exist."))
        value = req.body.get("amount", {}).get("value")
        cents = _cents(value) if value is not None else cap.amount - self.refunded(cap)
        if cents > cap.amount - self.refunded(cap):
            return Reply(422, _paypal_error("UNPROCESSABLE_ENTITY", "REFUND_AMOUNT_EXCEEDED",
                                            "The refund amount must be less than or equal to the capture amount "
                                            "that has not yet been refunded."))
        refund = {"id": f"RF{self.next_id():08d}", "status": cap.refund_status, "_cents": cents, "_capture": cap.id,
                  "amount": {"value": str(from_cents(cents)), "currency_code": "USD"},
                  "custom_id": req.body.get("custom_id"), "note_to_payer": req.body.get("note_to_payer")}
        if cap.refund_status == "PENDING":
            refund["status_details"] = {"reason": "ECHECK"}
        self.refunds[refund["id"]] = refund
        if request_id:
            self.by_request_id[request_id] = refund["id"]
        return Reply(201, _public(refund))


def _public(refund: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in refund.items() if not k.startswith("_")}


def _paypal_error(name: str, issue: str | None, description: str) -> dict[str, Any]:
    details = [{"issue": issue, "description": description}] if issue else []
    return {"name": name, "message": description, "details": details, "debug_id": "fake-debug-id"}


# ---- Afterpay ----------------------------------------------------------------------------------------------------


@dataclass
class AfterpayOrder:
    id: str
    amount: int
    refunds: list[dict[str, Any]] = field(default_factory=list)


class FakeAfterpay(Fake):
    """Afterpay Online API v2: Basic auth; POST /v2/payments/{orderId}/refund is idempotent for 24 hours when it
    carries requestId and merchantReference (the saved 201 is replayed); 409 while the same request is still
    processing; GET /v2/payments/{orderId} lists the order's refunds."""

    def __init__(self, merchant_id: str = "100101", secret_key: str = "afterpay-secret") -> None:
        super().__init__()
        self.credentials = (merchant_id, secret_key)
        self.orders: dict[str, AfterpayOrder] = {}
        self.saved: dict[tuple[str, str], Reply] = {}

    def add_order(self, amount: int) -> AfterpayOrder:
        order = AfterpayOrder(id=str(100_000_000 + self.next_id()), amount=amount)
        self.orders[order.id] = order
        return order

    def prune_keys(self) -> None:
        with self.lock:
            self.saved.clear()

    def handle(self, req: Request, query: dict[str, str]) -> Reply:
        if _basic(req) != self.credentials:
            return Reply(401, _afterpay_error(401, "unauthorized", "Credentials are required to access this resource."))
        if not req.headers.get("user-agent"):
            return Reply(400, _afterpay_error(400, "invalid_request", "User-Agent header is required"))
        parts = req.path.strip("/").split("/")
        if parts[:2] != ["v2", "payments"] or len(parts) not in (3, 4):
            return Reply(404, _afterpay_error(404, "not_found", "Not found"))
        order = self.orders.get(parts[2])
        if req.method == "GET" and len(parts) == 3:
            return Reply(200, {"id": order.id, "status": "APPROVED", "refunds": list(order.refunds),
                               "originalAmount": {"amount": str(from_cents(order.amount)), "currency": "USD"}}) \
                if order else Reply(404, _afterpay_error(404, "not_found", "Order not found"))
        if req.method == "POST" and len(parts) == 4 and parts[3] == "refund":
            return self._create(req, order)
        return Reply(404, _afterpay_error(404, "not_found", "Not found"))

    def _create(self, req: Request, order: AfterpayOrder | None) -> Reply:
        body = req.body
        key = (str(body.get("requestId") or ""), str(body.get("merchantReference") or ""))
        if all(key) and key in self.saved:
            return self.saved[key]
        if order is None:
            return Reply(412, _afterpay_error(412, "precondition_failed", "The orderId is invalid or not eligible"))
        cents = _cents(body.get("amount", {}).get("amount", "0"))
        left = order.amount - sum(_cents(r["amount"]["amount"]) for r in order.refunds)
        if cents > left:
            return Reply(422, _afterpay_error(422, "invalid_amount", "The amount requested exceeded the amount "
                                                                     "available."))
        refund = {"requestId": body.get("requestId"), "amount": body.get("amount"),
                  "merchantReference": body.get("merchantReference"),
                  "refundMerchantReference": body.get("refundMerchantReference"),
                  "refundId": str(70_000_000 + self.next_id()), "refundedAt": "2026-11-24T15:00:00.000Z"}
        order.refunds.append(refund)
        reply = Reply(201, dict(refund))
        if all(key):
            self.saved[key] = reply
        return reply


def _afterpay_error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"errorCode": code, "errorId": "fake-error-id", "message": message, "httpStatusCode": status}


def _cents(value: object) -> int:
    return to_cents(Decimal(str(value)))


def _basic(req: Request) -> tuple[str, str] | None:
    header = req.headers.get("authorization", "")
    if not header.startswith("Basic "):
        return None
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    return user, password


# ---- the server --------------------------------------------------------------------------------------------------


def _parse(content_type: str, raw: bytes) -> dict[str, Any]:
    """A JSON body, or a form body with Stripe's nested keys (metadata[reason]=...) folded into dicts."""
    if not raw:
        return {}
    if "json" in content_type:
        parsed = json.loads(raw)
        return parsed if isinstance(parsed, dict) else {}
    out: dict[str, Any] = {}
    for k, v in parse_qsl(raw.decode(), keep_blank_values=True):
        if "[" in k and k.endswith("]"):
            outer, inner = k[:-1].split("[", 1)
            out.setdefault(outer, {})[inner] = v
        else:
            out[k] = v
    return out


@contextmanager
def serve(fake: Fake) -> Iterator[str]:
    """Serve `fake` on a free loopback port; yields its base URL; stops it (releasing stalled answers) on exit."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # the tests read `fake.requests`, not stderr

        def _serve(self) -> None:
            split = urlsplit(self.path)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            req = Request(self.command, split.path, {k.lower(): v for k, v in self.headers.items()},
                          _parse(self.headers.get("Content-Type", ""), raw))
            fault = fake.take_fault() if self.command == "POST" and "oauth2" not in split.path else None
            with fake.lock:
                fake.requests.append(req)
                if fault == "unavailable":
                    reply = Reply(503, {"error": {"type": "api_error", "message": "Service unavailable"}})
                elif fault == "conflict":
                    reply = Reply(409, _afterpay_error(409, "conflict", "The request is still being processed"))
                else:
                    reply = fake.handle(req, dict(parse_qsl(split.query)))
            if fault == "drop":
                self.close_connection = True
                return
            if fault == "stall":
                fake.released.wait(timeout=30)  # bounded: the fake's stop releases it
            self._reply(reply)

        def _reply(self, reply: Reply) -> None:
            data = json.dumps(reply.body).encode()
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (a stalled answer)

        do_GET = do_POST = _serve  # noqa: N815 - the base class's names

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"fake-{type(fake).__name__}", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        fake.released.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
