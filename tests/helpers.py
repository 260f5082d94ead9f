"""Helpers every test module shares: the sample's clock, free loopback ports, row counts, and the stages run with
plain steps at a chosen moment (what the command line and the demo do, replayable)."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlmodel import SQLModel

import models.tables  # noqa: F401  (registers every table on the metadata)
from adapters.db import unit_of_work
from models.schemas import ReceiptIn, ReturnRequestIn
from service import stages
from service.results import Completed, Decided, Moved, SweepReport
from service.returns import Actor
from service.stages import LocalSteps
from service.steps import Pipeline

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.fromisoformat("2026-11-20T10:00:00-05:00")  # the sample's "today": its decisions hold here
LATER = NOW + timedelta(days=4)  # parcels reach the dock
API = Actor("api")


TALLIES: dict[str, Counter[str]] = {}  # what each suite tried and checked; conftest writes them out


def tally(suite: str) -> Counter[str]:
    """The counter a suite adds to; with RETURNS_TALLY_DIR set, the session writes it to <dir>/<suite>.json."""
    return TALLIES.setdefault(suite, Counter())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def row_counts(target: Pipeline | Engine) -> dict[str, int]:
    """Rows per table of the pipeline's (or engine's) database."""
    with unit_of_work(target.engine if isinstance(target, Pipeline) else target) as s:
        return {t.name: int(s.execute(select(func.count()).select_from(t)).scalar_one())
                for t in SQLModel.metadata.sorted_tables}


def at(p: Pipeline, now: datetime) -> LocalSteps:
    """The plain steps with the clock standing at `now`."""
    return LocalSteps(p, lambda: now)


def request(p: Pipeline, req: ReturnRequestIn, now: datetime = NOW, actor: Actor = API) -> Decided:
    return stages.after_request(at(p, now), req, actor)


def receive(p: Pipeline, receipt: ReceiptIn, now: datetime = LATER, claim: bool = False) -> Moved:
    """Record the receipt (and with `claim` start processing): the step the receipt stage starts with."""
    return p.receive(receipt, now, Actor.operator(receipt.by), claim=claim)


def process(p: Pipeline, rma: str, now: datetime = LATER, actor: Actor = API) -> Completed | None:
    return stages.process(at(p, now), rma, actor)


def review(p: Pipeline, rma: str, authorize: bool, note: str, by: str, now: datetime) -> Moved:
    """The operator's decision only (after receipt an authorize leaves it processing, for `finish`)."""
    return p.review(rma, authorize, note, Actor.operator(by), now)


def cancel(p: Pipeline, rma: str, note: str, by: str, now: datetime) -> Moved:
    return stages.after_cancel(at(p, now), rma, note, Actor.operator(by))


def sweep(p: Pipeline, as_of: datetime, now: datetime | None = None) -> SweepReport:
    return stages.sweep(at(p, now or as_of), as_of)


def redrive(p: Pipeline, rma: str, now: datetime) -> bool:
    return stages.redrive(at(p, now), rma)


def finish(p: Pipeline, rma: str, now: datetime, actor: Actor = API) -> Completed:
    """plan -> pay -> complete for a return already claimed (by a claim or an operator's review)."""
    return p.complete(p.pay(p.plan_refund(rma)), now, actor)


def as_json(out: Any) -> Any:
    """A stage's typed result as the JSON the edges answer."""
    return out.to_json() if hasattr(out, "to_json") else out


@dataclass
class WebhookReceiver:
    """A storefront's webhook endpoint on loopback: answers `answers` in turn (then 204) and keeps what it took."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    got: list[tuple[str, bytes]] = field(default_factory=list)  # (Returns-Signature, body) of each accepted POST

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.got]

    def types(self) -> list[str]:
        return [e["type"] for e in self.events()]

    def wait_for(self, wanted: set[str], timeout: float = 30.0) -> set[str]:
        """The event types seen once `wanted` are among them (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while not wanted <= set(self.types()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return set(self.types())


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    found = WebhookReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = found.answers.pop(0) if found.answers else 204
            if status < 300:
                found.got.append((self.headers["Returns-Signature"], body))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    found.url = f"http://127.0.0.1:{server.server_address[1]}/returns-events"
    try:
        yield found
    finally:
        server.shutdown()


def terminate(proc: subprocess.Popen[bytes], grace: float = 60.0) -> None:
    """SIGTERM a process we started (it stops what it started), then SIGKILL if it outstays `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- localstripe (a Stripe API server, test-only) ------------------------------------------------------------------

LOCALSTRIPE_KEY = "sk_test_localstripe"  # localstripe takes any key


def catalog_at_stripe(catalog: dict[str, Any], intents: dict[str, list[str]]) -> dict[str, Any]:
    """A copy of an import whose orders named in `intents` were captured at Stripe, one payment intent per payment."""
    data = copy.deepcopy(catalog)
    for o in data["orders"]:
        for pay, intent in zip(o["payments"], intents.get(o["number"], []), strict=False):
            pay |= {"provider": "stripe", "reference": intent}
            if pay["method"] == "paypal":  # a split between two cards at the processor, as Stripe would hold it
                pay |= {"method": "visa", "last4": "4242"}
    return data


@contextmanager
def localstripe_server() -> Iterator[str]:
    """localstripe on a free loopback port, its state in its own process only; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "localstripe_server.py"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):  # bounded wait for the port to accept; it is up well within this on a quiet machine
            if proc.poll() is not None:
                raise RuntimeError(f"localstripe exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("localstripe did not start listening")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def paid_intent(base: str, amount: int) -> str:
    """A payment intent paid by card at localstripe (what the storefront's checkout would have left)."""
    client = _localstripe_client(base)
    pm = client.v1.payment_methods.create(params={"type": "card", "card": {
        "number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}})
    pi = client.v1.payment_intents.create(params={"amount": amount, "currency": "usd", "payment_method": pm.id})
    assert client.v1.payment_intents.confirm(pi.id).status == "succeeded"
    return pi.id


def localstripe_refunds(base: str, intent: str) -> list[dict[str, object]]:
    """Every refund localstripe holds for the payment intent: its own record, not ours."""
    client = _localstripe_client(base)
    return [r.to_dict() for r in client.v1.refunds.list(params={"payment_intent": intent}).auto_paging_iter()]


def _localstripe_client(base: str) -> Any:
    import stripe  # only the payment suites pay for importing the SDK

    return stripe.StripeClient(LOCALSTRIPE_KEY, base_addresses={"api": base}, max_network_retries=0)


def stripe_signature(body: bytes, secret: str, at: int | None = None) -> str:
    """Stripe's scheme, written from its documentation: v1 = HMAC-SHA256(secret, "<t>.<body>")."""
    t = int(time.time()) if at is None else at
    return f"t={t},v1={hmac.new(secret.encode(), f'{t}.'.encode() + body, hashlib.sha256).hexdigest()}"


def stripe_refund_event(event_id: str, refund: dict[str, Any], kind: str = "refund.updated") -> bytes:
    return json.dumps({"id": event_id, "object": "event", "type": kind, "created": int(time.time()),
                       "data": {"object": refund}}).encode()
