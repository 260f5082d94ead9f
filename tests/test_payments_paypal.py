"""The PayPal adapter against the loopback fake of PayPal's documented Payments v2 refund contract (no PayPal
sandbox is reachable from here): OAuth2 token, PayPal-Request-Id replays, pending eCheck refunds, refusals, 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from adapters.payments.base import ProviderPayment, ProviderRefused, ProviderUnavailable, RefundStatus
from adapters.payments.paypal import PayPalRefunds
from tests.fake_providers import FakePayPal, serve

KEY = "refund:RMA-7K2Q:2"
REF = "RMA-7K2Q-2"


@pytest.fixture
def fake() -> Iterator[tuple[FakePayPal, str]]:
    f = FakePayPal()
    with serve(f) as url:
        yield f, url


def adapter_for(url: str, timeout: float = 5.0) -> PayPalRefunds:
    return PayPalRefunds("paypal-client", "paypal-secret", url, timeout=timeout)


def test_a_partial_refund_of_a_capture_carries_the_key_as_paypal_request_id(fake: tuple[FakePayPal, str]) -> None:
    f, url = fake
    cap = f.add_capture(5000)
    out = adapter_for(url).refund(ProviderPayment(2, "paypal", cap.id), 1234, KEY, REF, "P3 return")
    assert (out.status, out.amount_minor) == (RefundStatus.SUCCEEDED, 1234)
    [create] = f.creates("/refund")
    assert create.headers["paypal-request-id"] == KEY
    assert create.headers["authorization"].startswith("Bearer A21AA-fake-")
    assert create.body == {"amount": {"value": "12.34", "currency_code": "USD"}, "custom_id": REF,
                           "note_to_payer": "P3 return"}
    assert create.path == f"/v2/payments/captures/{cap.id}/refund"


def test_the_token_is_reused_and_renewed_once_paypal_rejects_it(fake: tuple[FakePayPal, str]) -> None:
    f, url = fake
    cap = f.add_capture(5000)
    adapter = adapter_for(url)
    adapter.refund(ProviderPayment(2, "paypal", cap.id), 100, "refund:A:2", "A-2", "P3 return")
    adapter.refund(ProviderPayment(2, "paypal", cap.id), 100, "refund:B:2", "B-2", "P3 return")
    assert f.tokens_issued == 1
    f.expire_tokens()
    adapter.refund(ProviderPayment(2, "paypal", cap.id), 100, "refund:C:2", "C-2", "P3 return")
    assert f.tokens_issued == 2 and f.refunded(cap) == 300


@pytest.mark.parametrize("fault", ["stall", "drop"])
def test_a_retry_after_a_lost_answer_gets_the_first_refund(fake: tuple[FakePayPal, str], fault: str) -> None:
    f, url = fake
    cap = f.add_capture(5000)
    payment = ProviderPayment(2, "paypal", cap.id)
    f.faults.append(fault)
    with pytest.raises(ProviderUnavailable):
        adapter_for(url, timeout=0.5).refund(payment, 1234, KEY, REF, "P3 return")
    assert len(f.refunds) == 1  # PayPal did refund
    out = adapter_for(url).refund(payment, 1234, KEY, REF, "P3 return")
    assert list(f.refunds) == [out.provider_ref] and f.refunded(cap) == 1234


def test_a_reused_request_id_for_another_amount_is_refused(fake: tuple[FakePayPal, str]) -> None:
    """PayPal answers a repeated PayPal-Request-Id with the first refund: one of another amount is not ours."""
    f, url = fake
    cap = f.add_capture(5000)
    adapter = adapter_for(url)
    adapter.refund(ProviderPayment(2, "paypal", cap.id), 1234, KEY, REF, "P3 return")
    with pytest.raises(ProviderRefused, match="already used"):
        adapter.refund(ProviderPayment(2, "paypal", cap.id), 999, KEY, REF, "P3 return")
    assert f.refunded(cap) == 1234


@pytest.mark.parametrize(("settled", "status"), [("COMPLETED", RefundStatus.SUCCEEDED),
                                                 ("FAILED", RefundStatus.FAILED),
                                                 ("CANCELLED", RefundStatus.CANCELED)])
def test_a_pending_echeck_refund_settles_later(fake: tuple[FakePayPal, str], settled: str,
                                               status: RefundStatus) -> None:
    f, url = fake
    cap = f.add_capture(5000, refund_status="PENDING")
    adapter = adapter_for(url)
    out = adapter.refund(ProviderPayment(2, "paypal", cap.id), 1234, KEY, REF, "P3 return")
    assert (out.status, out.failure_reason) == (RefundStatus.PENDING, "ECHECK")
    f.settle(out.provider_ref, settled)
    assert adapter.get_refund(out.provider_ref).status is status


def test_more_than_is_left_on_the_capture_is_refused(fake: tuple[FakePayPal, str]) -> None:
    f, url = fake
    cap = f.add_capture(1000)
    with pytest.raises(ProviderRefused) as caught:
        adapter_for(url).refund(ProviderPayment(2, "paypal", cap.id), 1001, KEY, REF, "P3 return")
    assert (caught.value.status_code, caught.value.code) == (422, "REFUND_AMOUNT_EXCEEDED")
    assert f.refunds == {}


def test_an_unknown_capture_is_refused(fake: tuple[FakePayPal, str]) -> None:
    _, url = fake
    with pytest.raises(ProviderRefused) as caught:
        adapter_for(url).refund(ProviderPayment(2, "paypal", "CAP-NOPE"), 100, KEY, REF, "P3 return")
    assert (caught.value.status_code, caught.value.code) == (404, "INVALID_RESOURCE_ID")


def test_a_5xx_is_retryable_and_the_retry_pays_once(fake: tuple[FakePayPal, str]) -> None:
    f, url = fake
    cap = f.add_capture(5000)
    payment = ProviderPayment(2, "paypal", cap.id)
    f.faults.append("unavailable")
    adapter = adapter_for(url)
    with pytest.raises(ProviderUnavailable, match="503"):
        adapter.refund(payment, 1234, KEY, REF, "P3 return")
    adapter.refund(payment, 1234, KEY, REF, "P3 return")
    assert f.refunded(cap) == 1234 and len(f.refunds) == 1


def test_wrong_credentials_are_refused_and_never_shown(fake: tuple[FakePayPal, str]) -> None:
    f, url = fake
    cap = f.add_capture(5000)
    adapter = PayPalRefunds("paypal-client", "not-the-secret", url)
    with pytest.raises(ProviderRefused) as caught:
        adapter.refund(ProviderPayment(2, "paypal", cap.id), 100, KEY, REF, "P3 return")
    assert caught.value.status_code == 401
    assert "not-the-secret" not in str(caught.value) and "not-the-secret" not in repr(adapter)
    assert f.refunds == {}
