"""Payment providers' webhooks in (SQLite and PostgreSQL, the providers' loopback fakes and localstripe, the API on
real HTTP): a verified refund event completes (or parks) its return once; a redelivery is ignored; a call that
does not verify is refused, changes nothing and is logged without its body."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from adapters.db import unit_of_work
from adapters.payments.providers import Providers
from models.tables import ProviderEventIn
from service.steps import Pipeline
from tests import helpers
from tests.fake_providers import FakePayPal, FakeStripe, serve
from tests.test_api import serve as serve_api
from tests.test_payments_pipeline import Shop, ask_and_receive, attempts, buy, kinds, payment, state

SECRET = "whsec_test_0123456789abcdef"
WEBHOOK_ID = "8PT597110X687430LKGECATA"


@dataclass
class Hooks:
    """The pipeline over the fakes, the API in front of it, and a plain HTTP client (providers carry no key)."""

    shop: Shop
    http: httpx.Client


@pytest.fixture
def hooks(pipeline: Pipeline) -> Iterator[Hooks]:
    stripe_fake, paypal_fake = FakeStripe(), FakePayPal()
    with serve(stripe_fake) as s_url, serve(paypal_fake) as p_url:
        env = {"RETURNS_STRIPE_API_KEY": stripe_fake.api_key, "RETURNS_STRIPE_API_BASE": s_url,
               "RETURNS_STRIPE_WEBHOOK_SECRET": SECRET, "RETURNS_PAYPAL_CLIENT_ID": "paypal-client",
               "RETURNS_PAYPAL_CLIENT_SECRET": "paypal-secret", "RETURNS_PAYPAL_API_BASE": p_url,
               "RETURNS_PAYPAL_WEBHOOK_ID": WEBHOOK_ID}
        providers = Providers(pipeline.engine, env=env, secrets=lambda name: None, timeout=2.0)
        p = Pipeline(settings=pipeline.settings, engine=pipeline.engine, providers=providers)
        with serve_api(p) as front, httpx.Client(base_url=front.url, timeout=30) as http:
            yield Hooks(Shop(p, stripe_fake, paypal_fake, None), http)  # type: ignore[arg-type]


def post_stripe(h: Hooks, body: bytes, signature: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return h.http.post("/v1/providers/stripe/webhook", content=body, headers=headers)


def events(p: Pipeline) -> list[tuple[str, str, str | None, str | None]]:
    with unit_of_work(p.engine) as s:
        return [(e.provider, e.event_id, e.provider_ref, e.rma)
                for e in s.scalars(select(ProviderEventIn).order_by(ProviderEventIn.id))]


def pending_stripe_return(h: Hooks, number: str) -> tuple[str, str]:
    """A return received and processing, its Stripe refund pending; its RMA and the refund's id."""
    ch = h.shop.stripe.add_payment(10700, refund_status="pending")
    buy(h.shop, number, payment(provider="stripe", reference=ch.intent))
    rma, _ = ask_and_receive(h.shop, number)
    [(_, _, ref, _, status)] = attempts(h.shop, rma)
    assert status == "pending" and state(h.shop, rma) == "processing" and ref
    return rma, ref


def test_a_signed_refund_event_completes_its_return_once_and_a_redelivery_is_ignored(hooks: Hooks) -> None:
    rma, ref = pending_stripe_return(hooks, "HOOK-1")
    hooks.shop.stripe.settle(ref, "succeeded")
    body = helpers.stripe_refund_event("evt_1", dict(hooks.shop.stripe.refunds[ref]))
    r = post_stripe(hooks, body, helpers.stripe_signature(body, SECRET))
    assert (r.status_code, r.json()) == (200, {"received": True, "duplicate": False})
    assert state(hooks.shop, rma) == "completed" and kinds(hooks.shop, rma).count("processed") == 1
    again = post_stripe(hooks, body, helpers.stripe_signature(body, SECRET))  # Stripe redelivers, freshly signed
    assert (again.status_code, again.json()) == (200, {"received": True, "duplicate": True})
    assert kinds(hooks.shop, rma).count("processed") == 1 and len(hooks.shop.stripe.creates("/v1/refunds")) == 1
    assert events(hooks.shop.p) == [("stripe", "evt_1", ref, rma)]


def test_the_event_is_a_hint_the_provider_is_asked_before_anything_changes(hooks: Hooks) -> None:
    """A verified event that says 'succeeded' while Stripe itself still says pending completes nothing."""
    rma, ref = pending_stripe_return(hooks, "HOOK-2")
    body = helpers.stripe_refund_event("evt_2", dict(hooks.shop.stripe.refunds[ref]) | {"status": "succeeded"})
    assert post_stripe(hooks, body, helpers.stripe_signature(body, SECRET)).status_code == 200
    assert state(hooks.shop, rma) == "processing" and "processed" not in kinds(hooks.shop, rma)


def test_a_failed_refund_event_parks_the_return_for_a_person(hooks: Hooks) -> None:
    rma, ref = pending_stripe_return(hooks, "HOOK-3")
    hooks.shop.stripe.settle(ref, "failed", "expired_or_canceled_card")
    body = helpers.stripe_refund_event("evt_3", dict(hooks.shop.stripe.refunds[ref]), "refund.failed")
    assert post_stripe(hooks, body, helpers.stripe_signature(body, SECRET)).status_code == 200
    assert state(hooks.shop, rma) == "review" and "review_needed" in kinds(hooks.shop, rma)


@pytest.mark.parametrize("how", ["unsigned", "other secret", "an hour old", "body changed", "garbage header"])
def test_a_call_that_does_not_verify_is_refused_changes_nothing_and_its_body_is_not_logged(
        hooks: Hooks, how: str, caplog: pytest.LogCaptureFixture) -> None:
    rma, ref = pending_stripe_return(hooks, f"HOOK-4{len(how)}")
    hooks.shop.stripe.settle(ref, "succeeded")
    refund = dict(hooks.shop.stripe.refunds[ref]) | {"description": "BODY-MARKER-42"}
    body = helpers.stripe_refund_event("evt_4", refund)
    signature = {"unsigned": None, "other secret": helpers.stripe_signature(body, "whsec_other"),
                 "an hour old": helpers.stripe_signature(body, SECRET, at=int(time.time()) - 3600),
                 "body changed": helpers.stripe_signature(body.replace(b"BODY-MARKER-42", b"BODY-MARKER-43"), SECRET),
                 "garbage header": "t=x,v1=" + "0" * 64}[how]
    before = helpers.row_counts(hooks.shop.p)
    with caplog.at_level(logging.INFO, logger="returns.api"):
        r = post_stripe(hooks, body, signature)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"] == "/problems/unverified-event"
    assert helpers.row_counts(hooks.shop.p) == before and state(hooks.shop, rma) == "processing"
    assert "refused a stripe webhook call" in caplog.text and "BODY-MARKER" not in caplog.text


def test_events_about_nothing_of_ours_are_acknowledged_and_change_nothing(hooks: Hooks) -> None:
    before = {k: v for k, v in helpers.row_counts(hooks.shop.p).items() if k != "provider_events"}
    for body in (helpers.stripe_refund_event("evt_5", {"object": "refund", "id": "re_unknown",
                                                                  "status": "succeeded"}),
                           json.dumps({"id": "evt_6", "type": "customer.created",
                                                 "data": {"object": {"object": "customer", "id": "cus_1"}}})
                            .encode()):
        answer = post_stripe(hooks, body, helpers.stripe_signature(body, SECRET))
        assert answer.json() == {"received": True, "duplicate": False}
    assert {k: v for k, v in helpers.row_counts(hooks.shop.p).items() if k != "provider_events"} == before
    assert events(hooks.shop.p) == [("stripe", "evt_5", "re_unknown", None), ("stripe", "evt_6", None, None)]


def test_a_provider_whose_webhook_is_not_set_up_is_refused(pipeline: Pipeline) -> None:
    p = Pipeline(settings=pipeline.settings, engine=pipeline.engine,
                 providers=Providers(pipeline.engine, env={}, secrets=lambda name: None))
    with serve_api(p) as front, httpx.Client(base_url=front.url) as http:
        for provider in ("stripe", "paypal"):
            r = http.post(f"/v1/providers/{provider}/webhook", content=b"{}")
            assert r.status_code == 404 and "WEBHOOK" in r.json()["detail"]
        assert http.post("/v1/providers/klarna/webhook", content=b"{}").status_code == 404


def paypal_refund_event(event_id: str, refund: dict[str, Any]) -> dict[str, Any]:
    return {"id": event_id, "event_version": "1.0", "create_time": "2026-12-03T10:00:00Z", "resource_type": "refund",
            "event_type": "PAYMENT.CAPTURE.REFUNDED", "resource": {k: v for k, v in refund.items()
                                                                  if not k.startswith("_")}}


def test_a_verified_paypal_refund_event_completes_its_return_and_a_forged_one_is_refused(hooks: Hooks) -> None:
    cap = hooks.shop.paypal.add_capture(10700, refund_status="PENDING")
    buy(hooks.shop, "HOOK-7", payment(method="paypal", last4=None, provider="paypal", reference=cap.id))
    rma, _ = ask_and_receive(hooks.shop, "HOOK-7")
    [(_, _, ref, _, status)] = attempts(hooks.shop, rma)
    assert status == "pending" and ref
    hooks.shop.paypal.settle(ref, "COMPLETED")
    event = paypal_refund_event("WH-1", hooks.shop.paypal.refunds[ref])
    forged = dict(hooks.shop.paypal.transmit(event, WEBHOOK_ID)) | {"PAYPAL-TRANSMISSION-SIG": "sig-forged"}
    r = hooks.http.post("/v1/providers/paypal/webhook", json=event, headers=forged)
    assert r.status_code == 400 and state(hooks.shop, rma) == "processing"
    assert hooks.http.post("/v1/providers/paypal/webhook", json=event).status_code == 400  # no headers at all
    headers = hooks.shop.paypal.transmit(event, WEBHOOK_ID)
    r = hooks.http.post("/v1/providers/paypal/webhook", content=json.dumps(event).encode(), headers=headers)
    assert (r.status_code, r.json()) == (200, {"received": True, "duplicate": False})
    assert state(hooks.shop, rma) == "completed" and events(hooks.shop.p) == [("paypal", "WH-1", ref, rma)]


def test_an_event_signed_by_localstripe_passes_the_signature_check(pipeline: Pipeline) -> None:
    """Signed by a third party's implementation of Stripe's scheme, not by this suite's own."""
    with helpers.localstripe_server() as base:
        env = {"RETURNS_STRIPE_API_KEY": helpers.LOCALSTRIPE_KEY, "RETURNS_STRIPE_API_BASE": base,
               "RETURNS_STRIPE_WEBHOOK_SECRET": SECRET}
        p = Pipeline(settings=pipeline.settings, engine=pipeline.engine,
                     providers=Providers(pipeline.engine, env=env, secrets=lambda name: None))
        with serve_api(p) as front:
            httpx.post(f"{base}/_config/webhooks/returns", json={
                "url": f"{front.url}/v1/providers/stripe/webhook", "secret": SECRET,
                "events": ["customer.created"]}, headers={"Authorization": f"Bearer {helpers.LOCALSTRIPE_KEY}"}
                       ).raise_for_status()
            httpx.post(f"{base}/v1/customers", data={"description": "webhook test"},
                       headers={"Authorization": f"Bearer {helpers.LOCALSTRIPE_KEY}"}).raise_for_status()
            for _ in range(300):  # localstripe delivers a second after the event; bounded wait
                if found := [e for e in events(p) if e[0] == "stripe"]:
                    break
                time.sleep(0.05)
            assert len(found) == 1 and found[0][1].startswith("evt_")
