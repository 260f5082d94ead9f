"""The Afterpay adapter against the loopback fake of Afterpay's documented Online API v2 refund contract (no
Afterpay sandbox is reachable from here): requestId + merchantReference replays, 409, pruned keys, refusals."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from adapters.payments.afterpay import AfterpayRefunds
from adapters.payments.base import ProviderPayment, ProviderRefused, ProviderUnavailable, RefundStatus
from tests.fake_providers import FakeAfterpay, serve

KEY = "refund:RMA-7K2Q:3"
REF = "RMA-7K2Q-3"


@pytest.fixture
def fake() -> Iterator[tuple[FakeAfterpay, str]]:
    f = FakeAfterpay()
    with serve(f) as url:
        yield f, url


def adapter_for(url: str, timeout: float = 5.0) -> AfterpayRefunds:
    return AfterpayRefunds("100101", "afterpay-secret", url, timeout=timeout)


def test_a_partial_refund_carries_the_key_as_request_id_with_the_merchant_reference(
        fake: tuple[FakeAfterpay, str]) -> None:
    f, url = fake
    order = f.add_order(5000)
    out = adapter_for(url).refund(ProviderPayment(3, "afterpay", order.id), 1234, KEY, REF, "P3 return")
    [refund] = order.refunds
    assert (out.provider_ref, out.status, out.amount_minor) == (f"{order.id}/{refund['refundId']}",
                                                                RefundStatus.SUCCEEDED, 1234)
    [create] = f.creates("/refund")
    assert create.body == {"requestId": KEY, "amount": {"amount": "12.34", "currency": "USD"},
                           "merchantReference": REF, "refundMerchantReference": REF}
    assert create.headers["user-agent"].startswith("returns-pipeline/")
    assert adapter_for(url).get_refund(out.provider_ref) == out


@pytest.mark.parametrize("fault", ["stall", "drop", "conflict", "unavailable"])
def test_an_unknown_outcome_is_retryable_and_the_retry_pays_once(fake: tuple[FakeAfterpay, str], fault: str) -> None:
    f, url = fake
    order = f.add_order(5000)
    payment = ProviderPayment(3, "afterpay", order.id)
    f.faults.append(fault)
    with pytest.raises(ProviderUnavailable):
        adapter_for(url, timeout=0.5).refund(payment, 1234, KEY, REF, "P3 return")
    out = adapter_for(url).refund(payment, 1234, KEY, REF, "P3 return")
    assert [r["refundId"] for r in order.refunds] == [out.provider_ref.split("/")[1]]


def test_the_same_request_id_and_reference_replay_the_saved_refund(fake: tuple[FakeAfterpay, str]) -> None:
    """Seen from the wire: when the lookup cannot see the first refund yet, Afterpay's own replay holds."""
    f, url = fake
    order = f.add_order(5000)
    adapter = adapter_for(url)
    first = adapter.refund(ProviderPayment(3, "afterpay", order.id), 1234, KEY, REF, "P3 return")
    order.refunds.clear()  # as if the order's refund list lagged behind the refund itself
    again = adapter.refund(ProviderPayment(3, "afterpay", order.id), 1234, KEY, REF, "P3 return")
    assert again == first and len(f.creates("/refund")) == 2 and order.refunds == []


def test_after_afterpay_forgot_the_request_id_the_lookup_stops_a_second_refund(fake: tuple[FakeAfterpay, str]) -> None:
    f, url = fake
    order = f.add_order(5000)
    payment = ProviderPayment(3, "afterpay", order.id)
    first = adapter_for(url).refund(payment, 1234, KEY, REF, "P3 return")
    f.prune_keys()  # more than 24 hours later
    assert adapter_for(url).refund(payment, 1234, KEY, REF, "P3 return") == first
    assert len(order.refunds) == 1 and len(f.creates("/refund")) == 1


def test_more_than_is_left_is_refused(fake: tuple[FakeAfterpay, str]) -> None:
    f, url = fake
    order = f.add_order(1000)
    with pytest.raises(ProviderRefused) as caught:
        adapter_for(url).refund(ProviderPayment(3, "afterpay", order.id), 1001, KEY, REF, "P3 return")
    assert (caught.value.status_code, caught.value.code) == (422, "invalid_amount")
    assert order.refunds == []


def test_an_unknown_order_is_refused(fake: tuple[FakeAfterpay, str]) -> None:
    _, url = fake
    with pytest.raises(ProviderRefused) as caught:
        adapter_for(url).refund(ProviderPayment(3, "afterpay", "999"), 100, KEY, REF, "P3 return")
    assert caught.value.status_code == 404


def test_an_unknown_refund_is_refused(fake: tuple[FakeAfterpay, str]) -> None:
    f, url = fake
    order = f.add_order(1000)
    with pytest.raises(ProviderRefused, match="no refund"):
        adapter_for(url).get_refund(f"{order.id}/12345")


def test_wrong_credentials_are_refused_and_never_shown(fake: tuple[FakeAfterpay, str]) -> None:
    f, url = fake
    order = f.add_order(5000)
    adapter = AfterpayRefunds("100101", "not-the-secret", url)
    with pytest.raises(ProviderRefused) as caught:
        adapter.refund(ProviderPayment(3, "afterpay", order.id), 100, KEY, REF, "P3 return")
    assert caught.value.status_code == 401
    assert "not-the-secret" not in str(caught.value) and "not-the-secret" not in repr(adapter)
