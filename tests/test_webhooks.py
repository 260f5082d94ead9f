"""Webhooks out, through the outbox: every transition a storefront hears about becomes one signed POST per endpoint,
written in the transition's transaction, delivered at least once, retried with backoff while the endpoint fails,
each delivery visible. A receiver on loopback checks the signature as a storefront would. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
from conftest import SAMPLE
from helpers import LATER, NOW, WebhookReceiver, cancel, receive, request, webhook_receiver

from adapters.webhooks import signature, verify
from models.schemas import ReceiptIn, ReturnRequestIn, parse
from service.steps import Pipeline

SAMPLE_REQUESTS = {s["request"]["order_number"]: s["request"] for s in json.loads(
    (SAMPLE / "requests.json").read_text(encoding="utf-8"))}


@pytest.fixture
def hook() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as found:
        yield found


def ask(order: str) -> ReturnRequestIn:
    return parse(ReturnRequestIn, SAMPLE_REQUESTS[order])


def test_every_transition_is_posted_signed_once_per_endpoint(sample_pipeline: Pipeline, hook: WebhookReceiver) -> None:
    p = sample_pipeline
    secret = p.add_webhook(hook.url, NOW)["secret"]
    rma = request(p, ask("IS-1001")).rma_number
    assert rma
    receipt = parse(ReceiptIn, {"rma": rma, "received_at": LATER.isoformat(),
                                "lines": [{"sku": "VC-SERUM-30", "unopened": 1}]})
    receive(p, receipt)
    p.relay(LATER)
    declined = request(p, ask("IS-1003"))
    assert declined.rma_number is None
    assert hook.types() == ["return.authorized", "return.received", "return.declined"]
    for header, body in hook.got:
        timestamp = int(header.split(",")[0].removeprefix("t="))
        assert verify(secret, header, body, now=timestamp)
        assert header == signature(secret, timestamp, body)
        assert "@" not in body.decode()  # ids and states, no personal data
    authorized = json.loads(hook.got[0][1])
    assert (authorized["rma_number"], authorized["order_number"], authorized["state"]) == (rma, "IS-1001", "authorized")
    assert authorized["previous_state"] == "requested" and authorized["refund_total"] == "72.76"
    assert not verify("whsec_wrong", hook.got[0][0], hook.got[0][1], now=timestamp)
    assert p.outbox_counts() == {"pending": 0, "sent": 3, "failed": 0}  # the emails' counts leave webhooks out


def test_a_failing_endpoint_is_retried_with_backoff_and_each_attempt_is_visible(sample_pipeline: Pipeline,
                                                                                 hook: WebhookReceiver) -> None:
    p = sample_pipeline
    p.add_webhook(hook.url, NOW)
    hook.answers = [503, 500]
    rma = request(p, ask("IS-1001")).rma_number
    assert hook.got == []
    (shown,) = p.webhooks()
    assert shown["deliveries"] == {"pending": 1}
    assert shown["latest"][0]["attempts"] == 1 and "503" in shown["latest"][0]["last_error"]
    assert p.relay(NOW).sent == []  # backing off: not due yet
    p.relay(NOW + timedelta(minutes=5))  # second attempt: 500
    p.relay(NOW + timedelta(hours=2))  # third: delivered
    assert hook.types() == ["return.authorized"]
    (shown,) = p.webhooks()
    assert shown["deliveries"] == {"sent": 1}
    assert shown["latest"][0]["attempts"] == 3 and shown["latest"][0]["rma"] == rma


def test_an_unreachable_endpoint_does_not_hold_back_the_emails(sample_pipeline: Pipeline) -> None:
    p = sample_pipeline
    p.add_webhook("http://127.0.0.1:9/nothing-listens-here", NOW)
    request(p, ask("IS-1001"))
    assert p.outbox_counts() == {"pending": 0, "sent": 1, "failed": 0}
    assert p.webhooks()[0]["deliveries"] == {"pending": 1}


def test_a_removed_endpoint_gets_nothing_more(sample_pipeline: Pipeline, hook: WebhookReceiver) -> None:
    p = sample_pipeline
    endpoint = p.add_webhook(hook.url, NOW)
    rma = request(p, ask("IS-1001")).rma_number
    assert rma and hook.types() == ["return.authorized"]
    p.remove_webhook(endpoint["id"], NOW)
    cancel(p, rma, "customer changed their mind", "care", NOW)
    assert hook.types() == ["return.authorized"]
    assert p.webhooks()[0]["active"] is False
