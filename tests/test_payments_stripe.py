"""The Stripe adapter: against a real `localstripe` on loopback for the happy path, and against the loopback fake of
Stripe's documented idempotency (tests/fake_providers.py) for what localstripe cannot show: it ignores
Idempotency-Key and makes every refund succeed at once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine

from adapters.payments.base import ProviderPayment, ProviderRefused, ProviderUnavailable, RefundStatus
from adapters.payments.providers import Providers
from adapters.payments.stripe import StripeRefunds
from tests.fake_providers import FakeStripe, serve
from tests.helpers import LOCALSTRIPE_KEY, localstripe_refunds, paid_intent

KEY = "refund:RMA-7K2Q:1"
REF = "RMA-7K2Q-1"


# ---- localstripe -------------------------------------------------------------------------------------------------


def test_a_partial_refund_of_a_payment_intent_shows_up_in_localstripe(localstripe: str) -> None:
    intent = paid_intent(localstripe, 5000)
    adapter = StripeRefunds(LOCALSTRIPE_KEY, localstripe, max_network_retries=0)
    out = adapter.refund(ProviderPayment(1, "stripe", intent), 1234, KEY, REF, "P3 return, 2 units")
    assert out.status is RefundStatus.SUCCEEDED and out.amount_minor == 1234
    [seen] = localstripe_refunds(localstripe, intent)
    assert (seen["id"], seen["amount"], seen["status"]) == (out.provider_ref, 1234, "succeeded")
    assert seen["metadata"] == {"merchant_reference": REF, "reason": "P3 return, 2 units"}
    assert adapter.get_refund(out.provider_ref).status is RefundStatus.SUCCEEDED


def test_a_retry_at_localstripe_finds_the_first_refund_by_its_reference(localstripe: str) -> None:
    """localstripe ignores Idempotency-Key (as Stripe does once a key is pruned): the lookup is what holds."""
    intent = paid_intent(localstripe, 5000)
    adapter = StripeRefunds(LOCALSTRIPE_KEY, localstripe, max_network_retries=0)
    payment = ProviderPayment(1, "stripe", intent)
    first = adapter.refund(payment, 2000, KEY, REF, "P3 return")
    assert adapter.refund(payment, 2000, KEY, REF, "P3 return") == first
    assert [r["amount"] for r in localstripe_refunds(localstripe, intent)] == [2000]
    # A second return of the same order refunds the same intent under its own reference.
    other = adapter.refund(payment, 500, "refund:RMA-9XW3:1", "RMA-9XW3-1", "P3 return")
    assert other.provider_ref != first.provider_ref
    assert sorted(r["amount"] for r in localstripe_refunds(localstripe, intent)) == [500, 2000]


def test_the_environment_points_the_stripe_adapter_at_localstripe(localstripe: str) -> None:
    intent = paid_intent(localstripe, 3000)
    providers = Providers(create_engine("sqlite://"), env={"RETURNS_STRIPE_API_KEY": "sk_test_from_env",
                                                           "RETURNS_STRIPE_API_BASE": localstripe},
                          secrets=lambda name: None)
    adapter = providers.adapter("stripe")
    assert isinstance(adapter, StripeRefunds) and "sk_test_from_env" not in repr(adapter)
    adapter.refund(ProviderPayment(1, "stripe", intent), 999, KEY, REF, "P4 return")
    assert [r["amount"] for r in localstripe_refunds(localstripe, intent)] == [999]


# ---- the fake: Stripe's documented idempotency, pending refunds, refusals, 5xx -------------------------------------


@pytest.fixture
def fake() -> Iterator[tuple[FakeStripe, str]]:
    f = FakeStripe()
    with serve(f) as url:
        yield f, url


def adapter_for(url: str, *, retries: int = 0, timeout: float = 5.0) -> StripeRefunds:
    return StripeRefunds("sk_test_fake", url, max_network_retries=retries, timeout=timeout)


def test_the_refund_key_is_stripes_idempotency_key(fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    ch = f.add_payment(5000)
    out = adapter_for(url).refund(ProviderPayment(1, "stripe", ch.intent), 1234, KEY, REF, "P3 return")
    [create] = f.creates("/v1/refunds")
    assert create.headers["idempotency-key"] == KEY
    assert create.body == {"payment_intent": ch.intent, "amount": "1234",
                           "metadata": {"merchant_reference": REF, "reason": "P3 return"}}
    assert (out.provider_ref, out.status, out.amount_minor) == (next(iter(f.refunds)), RefundStatus.SUCCEEDED, 1234)


def test_a_charge_reference_refunds_the_charge(fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    ch = f.add_payment(5000)
    adapter_for(url).refund(ProviderPayment(1, "stripe", ch.charge), 100, KEY, REF, "P3 return")
    assert f.creates("/v1/refunds")[0].body["charge"] == ch.charge


@pytest.mark.parametrize("fault", ["stall", "drop"])
def test_a_retry_after_a_timeout_or_a_lost_answer_gets_the_saved_response(fake: tuple[FakeStripe, str],
                                                                          fault: str) -> None:
    """Stripe paid, the answer never came: the SDK's retry resends the same key and Stripe replays its answer."""
    f, url = fake
    ch = f.add_payment(5000)
    f.faults.append(fault)
    out = adapter_for(url, retries=1, timeout=0.5).refund(ProviderPayment(1, "stripe", ch.intent), 1234, KEY, REF,
                                                           "P3 return")
    first, second = f.creates("/v1/refunds")
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] == KEY
    assert len(f.refunds) == 1 and out.provider_ref in f.refunds and f.refunded(ch) == 1234


def test_without_sdk_retries_a_timeout_is_retryable_and_the_next_call_pays_nothing_more(
        fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    ch = f.add_payment(5000)
    payment = ProviderPayment(1, "stripe", ch.intent)
    f.faults.append("stall")
    with pytest.raises(ProviderUnavailable):
        adapter_for(url, timeout=0.5).refund(payment, 1234, KEY, REF, "P3 return")
    assert len(f.refunds) == 1  # Stripe did pay
    out = adapter_for(url).refund(payment, 1234, KEY, REF, "P3 return")
    assert list(f.refunds) == [out.provider_ref] and f.refunded(ch) == 1234


def test_the_same_key_with_other_parameters_is_refused(fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    ch = f.add_payment(5000)
    adapter = adapter_for(url)
    adapter.refund(ProviderPayment(1, "stripe", ch.intent), 1234, KEY, REF, "P3 return")
    with pytest.raises(ProviderRefused) as caught:
        adapter.refund(ProviderPayment(1, "stripe", ch.intent), 1500, KEY, "RMA-OTHER-1", "P3 return")
    assert caught.value.status_code == 400 and "same parameters" in str(caught.value)
    assert f.refunded(ch) == 1234


def test_a_refund_for_another_amount_under_the_same_reference_is_refused(fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    ch = f.add_payment(5000)
    adapter = adapter_for(url)
    adapter.refund(ProviderPayment(1, "stripe", ch.intent), 1234, KEY, REF, "P3 return")
    with pytest.raises(ProviderRefused, match="already used"):
        adapter.refund(ProviderPayment(1, "stripe", ch.intent), 1500, KEY, REF, "P3 return")
    assert len(f.creates("/v1/refunds")) == 1


def test_after_stripe_pruned_the_key_the_lookup_stops_a_second_refund(fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    ch = f.add_payment(5000)
    payment = ProviderPayment(1, "stripe", ch.intent)
    first = adapter_for(url).refund(payment, 1234, KEY, REF, "P3 return")
    f.prune_keys()  # more than 24 hours later, an operator retries
    assert adapter_for(url).refund(payment, 1234, KEY, REF, "P3 return") == first
    assert len(f.creates("/v1/refunds")) == 1 and f.refunded(ch) == 1234


def test_two_refunds_under_one_reference_are_refused_for_a_person(fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    ch = f.add_payment(5000)
    for n in (1, 2):
        f.refunds[f"re_dup{n}"] = {"id": f"re_dup{n}", "object": "refund", "amount": 100, "charge": ch.charge,
                                   "payment_intent": ch.intent, "status": "succeeded", "metadata":
                                   {"merchant_reference": REF}}
    with pytest.raises(ProviderRefused, match="2 refunds"):
        adapter_for(url).refund(ProviderPayment(1, "stripe", ch.intent), 100, KEY, REF, "P3 return")
    assert f.creates("/v1/refunds") == []


@pytest.mark.parametrize(("settled", "reason"), [("succeeded", None), ("failed", "expired_or_canceled_card"),
                                                 ("canceled", None)])
def test_a_pending_refund_settles_later(fake: tuple[FakeStripe, str], settled: str, reason: str | None) -> None:
    f, url = fake
    ch = f.add_payment(5000, refund_status="pending")
    adapter = adapter_for(url)
    out = adapter.refund(ProviderPayment(1, "stripe", ch.intent), 1234, KEY, REF, "P3 return")
    assert out.status is RefundStatus.PENDING and not out.status.final
    assert adapter.get_refund(out.provider_ref).status is RefundStatus.PENDING
    f.settle(out.provider_ref, settled, reason)
    later = adapter.get_refund(out.provider_ref)
    assert (later.status, later.failure_reason) == (RefundStatus(settled), reason) and later.status.final


def test_a_402_refusal_is_permanent_and_replayed_on_retry(fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    ch = f.add_payment(5000, refuse=(402, "card_error", "card_declined"))
    adapter = adapter_for(url)
    for _ in range(2):
        with pytest.raises(ProviderRefused) as caught:
            adapter.refund(ProviderPayment(1, "stripe", ch.intent), 1234, KEY, REF, "P3 return")
        assert (caught.value.status_code, caught.value.code) == (402, "card_declined")
    assert f.refunds == {}


def test_a_400_refusal_more_than_is_left_on_the_charge(fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    ch = f.add_payment(1000)
    with pytest.raises(ProviderRefused) as caught:
        adapter_for(url).refund(ProviderPayment(1, "stripe", ch.intent), 1001, KEY, REF, "P3 return")
    assert caught.value.status_code == 400 and "greater than unrefunded" in str(caught.value)
    assert f.refunds == {}


def test_a_5xx_is_retryable_and_the_retry_pays_once(fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    ch = f.add_payment(5000)
    payment = ProviderPayment(1, "stripe", ch.intent)
    f.faults.append("unavailable")
    with pytest.raises(ProviderUnavailable, match="503"):
        adapter_for(url).refund(payment, 1234, KEY, REF, "P3 return")
    assert f.refunds == {}
    adapter_for(url).refund(payment, 1234, KEY, REF, "P3 return")
    assert f.refunded(ch) == 1234 and len(f.refunds) == 1


def test_a_wrong_api_key_is_refused_and_never_shown(fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    ch = f.add_payment(5000)
    adapter = StripeRefunds("sk_test_wrong_secret", url, max_network_retries=0)
    with pytest.raises(ProviderRefused) as caught:
        adapter.refund(ProviderPayment(1, "stripe", ch.intent), 1234, KEY, REF, "P3 return")
    assert caught.value.status_code == 401
    assert "sk_test_wrong_secret" not in str(caught.value) and "sk_test_wrong_secret" not in repr(adapter)


def test_a_reference_that_is_not_stripes_is_refused_before_any_request(fake: tuple[FakeStripe, str]) -> None:
    f, url = fake
    with pytest.raises(ProviderRefused, match="not a Stripe"):
        adapter_for(url).refund(ProviderPayment(1, "stripe", "CAP-123"), 100, KEY, REF, "P3 return")
    assert f.requests == []
