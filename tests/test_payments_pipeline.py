"""Payments through their providers in the pipeline (SQLite and PostgreSQL, the providers' loopback fakes): the
import records who captured each payment; a refund is paid at that provider once, a pending one completes when
the sweep sees it succeed, a failed one waits in review for a person, and a pending one holds its payment's room."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from pydantic import ValidationError
from sqlalchemy import select, text, update

from adapters.db import MIGRATIONS, engine_for, normalize_url, unit_of_work, upgrade
from adapters.payments.providers import Providers
from models.errors import InvalidInput, TransientError
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, parse
from models.states import State
from models.tables import OutboxMessage, Payment, ProviderRefund, Return, Transition
from service import stages
from service.reconcile import reconcile
from service.results import Completed, Moved
from service.returns import Actor
from service.steps import Pipeline
from tests import helpers
from tests.fake_providers import FakeAfterpay, FakePayPal, FakeStripe, serve
from tests.helpers import LATER, NOW

CUSTOMER = {"account": "ACC-PAY", "name": "Pay Tester", "email": "pay@example.com",
            "address": {"line1": "1 A St", "city": "Lantana", "region": "FL", "postal_code": "33462",
                        "country": "US"}}
PRODUCT = {"sku": "PAY-SERUM", "name": "Serum", "kind": "skincare", "size": "retail", "price": "50.00"}


def order(number: str, *payments: dict[str, Any]) -> dict[str, Any]:
    return {"number": number, "account": "ACC-PAY", "channel": "direct", "placed_at": "2026-11-05T10:00:00-05:00",
            "delivered_at": "2026-11-08T10:00:00-05:00",
            "lines": [{"sku": "PAY-SERUM", "quantity": 2, "unit_price": "50.00", "unit_tax": "3.50",
                       "expires_on": "2028-01-31"}],
            "payments": list(payments)}


def payment(amount: str = "107.00", **kw: Any) -> dict[str, Any]:
    return {"method": "visa", "amount": amount, "last4": "4242", "captured_at": "2026-11-05T10:00:00-05:00", **kw}


def test_the_import_records_each_payments_provider_and_reference(pipeline: Pipeline) -> None:
    pipeline.import_data(parse(ImportIn, {"products": [PRODUCT], "customers": [CUSTOMER], "orders": [
        order("PAY-1", payment("60.00", provider="stripe", reference="pi_3Nabc"),
              payment("47.00", method="paypal", last4=None, provider="paypal", reference="2GG279541U471931P")),
        order("PAY-2", payment()),
        order("PAY-3", payment(provider="ledger"))]}))
    with unit_of_work(pipeline.engine) as s:
        rows = [(p.order_number, p.provider, p.reference) for p in s.scalars(select(Payment).order_by(Payment.id))]
    assert rows == [("PAY-1", "stripe", "pi_3Nabc"), ("PAY-1", "paypal", "2GG279541U471931P"),
                    ("PAY-2", "ledger", None), ("PAY-3", "ledger", None)]


@pytest.mark.parametrize("bad", [{"provider": "stripe"}, {"reference": "pi_3Nabc"},
                                 {"provider": "ledger", "reference": "pi_3Nabc"},
                                 {"provider": "klarna", "reference": "k1"},
                                 {"provider": "stripe", "reference": "pi 3N/../x"}])
def test_a_provider_without_its_reference_or_an_odd_one_is_refused(bad: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        parse(ImportIn, {"products": [PRODUCT], "customers": [CUSTOMER], "orders": [order("PAY-X", payment(**bad))]})


def test_a_database_from_before_providers_keeps_its_payments_on_the_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url))
    cfg.attributes["engine"] = engine_for(url)
    command.upgrade(cfg, "0001")
    with engine_for(url).begin() as conn:
        conn.execute(text("INSERT INTO customers VALUES ('A1', 'N', 'n@example.com', 'l1', '', 'c', '', '1', 'US')"))
        conn.execute(text("INSERT INTO orders VALUES ('O1', 'A1', 'direct', '2026-11-05 15:00:00', NULL)"))
        conn.execute(text("INSERT INTO payments (order_number, seq, method, amount_cents, refunded_cents, last4, "
                          "captured_at) VALUES ('O1', 1, 'visa', 1000, 0, '4242', '2026-11-05 15:00:00')"))
    upgrade(url)
    with unit_of_work(engine_for(url)) as s:
        [row] = s.scalars(select(Payment)).all()
        assert (row.provider, row.reference) == ("ledger", None)


# ---- refunds through the providers (the loopback fakes) ----------------------------------------------------------


@dataclass
class Shop:
    """A pipeline whose providers are the loopback fakes, and the fakes."""

    p: Pipeline
    stripe: FakeStripe
    paypal: FakePayPal
    afterpay: FakeAfterpay


@pytest.fixture
def shop(pipeline: Pipeline) -> Iterator[Shop]:
    fakes = FakeStripe(), FakePayPal(), FakeAfterpay()
    with serve(fakes[0]) as s_url, serve(fakes[1]) as p_url, serve(fakes[2]) as a_url:
        env = {"RETURNS_STRIPE_API_KEY": fakes[0].api_key, "RETURNS_STRIPE_API_BASE": s_url,
               "RETURNS_PAYPAL_CLIENT_ID": "paypal-client", "RETURNS_PAYPAL_CLIENT_SECRET": "paypal-secret",
               "RETURNS_PAYPAL_API_BASE": p_url, "RETURNS_AFTERPAY_MERCHANT_ID": "100101",
               "RETURNS_AFTERPAY_SECRET_KEY": "afterpay-secret", "RETURNS_AFTERPAY_API_BASE": a_url}
        providers = Providers(pipeline.engine, env=env, secrets=lambda name: None, timeout=2.0)
        yield Shop(Pipeline(settings=pipeline.settings, engine=pipeline.engine, providers=providers), *fakes)


def buy(shop: Shop, number: str, *payments: dict[str, Any]) -> None:
    shop.p.import_data(parse(ImportIn, {"products": [PRODUCT], "customers": [CUSTOMER],
                                        "orders": [order(number, *payments)]}))


def ask_and_receive(shop: Shop, number: str, units: int = 1, at: datetime = LATER) -> tuple[str, Moved | Completed]:
    """A return of `units` serums (P3: 53.50 each), authorized at NOW, received (and processed) at `at`."""
    decided = stages.after_request(helpers.at(shop.p, NOW), parse(ReturnRequestIn, {
        "order_number": number, "email": "pay@example.com", "reason": "unwanted",
        "lines": [{"sku": "PAY-SERUM", "quantity": units}]}))
    assert decided.rma_number and decided.authorized
    receipt = parse(ReceiptIn, {"rma": decided.rma_number, "received_at": at.isoformat(), "by": "dock",
                                "lines": [{"sku": "PAY-SERUM", "unopened": units}]})
    return decided.rma_number, stages.after_receipt(helpers.at(shop.p, at), receipt)


def state(shop: Shop, rma: str) -> str:
    with unit_of_work(shop.p.engine) as s:
        return str(s.scalars(select(Return.state).where(Return.rma == rma)).one())


def attempts(shop: Shop, rma: str) -> list[tuple[int, str, str | None, int, str]]:
    with unit_of_work(shop.p.engine) as s:
        rid = s.scalars(select(Return.id).where(Return.rma == rma)).one()
        return [(r.attempt, r.idempotency_key, r.provider_ref, r.amount_cents, r.status) for r in s.scalars(
            select(ProviderRefund).where(ProviderRefund.return_id == rid).order_by(ProviderRefund.id))]


def kinds(shop: Shop, rma: str) -> list[str]:
    with unit_of_work(shop.p.engine) as s:
        rid = s.scalars(select(Return.id).where(Return.rma == rma)).one()
        return [str(m.kind) for m in s.scalars(select(OutboxMessage).where(OutboxMessage.return_id == rid)
                                               .order_by(OutboxMessage.id))]


def payment_ids(shop: Shop, number: str) -> list[int]:
    with unit_of_work(shop.p.engine) as s:
        return [int(i) for i in s.scalars(select(Payment.id).where(Payment.order_number == number)
                                          .order_by(Payment.seq))]


def test_a_stripe_payment_is_refunded_at_stripe_and_the_return_completes(shop: Shop) -> None:
    ch = shop.stripe.add_payment(10700)
    buy(shop, "PAY-1", payment(provider="stripe", reference=ch.intent))
    rma, out = ask_and_receive(shop, "PAY-1")
    assert isinstance(out, Completed) and str(out.refund_total) == "53.50"
    [pid] = payment_ids(shop, "PAY-1")
    [refund] = shop.stripe.refunds.values()
    assert (refund["amount"], refund["metadata"]["merchant_reference"]) == (5350, f"{rma}-{pid}")
    assert shop.stripe.creates("/v1/refunds")[0].headers["idempotency-key"] == f"refund:{rma}:{pid}"
    assert attempts(shop, rma) == [(1, f"refund:{rma}:{pid}", refund["id"], 5350, "succeeded")]
    assert shop.p.show(rma, LATER)["payments_refunded"][0]["reference"] == refund["id"]
    assert "processed" in kinds(shop, rma)


def test_a_pending_refund_leaves_the_return_processing_until_the_sweep_sees_it_succeed(shop: Shop) -> None:
    ch = shop.stripe.add_payment(10700, refund_status="pending")
    buy(shop, "PAY-2", payment(provider="stripe", reference=ch.intent))
    rma, out = ask_and_receive(shop, "PAY-2")
    assert isinstance(out, Moved) and out.state is State.PROCESSING and state(shop, rma) == "processing"
    [(_, _, ref, _, status)] = attempts(shop, rma)
    assert ref in shop.stripe.refunds and status == "pending" and "processed" not in kinds(shop, rma)
    # Still pending when the sweep asks (after the claim's lease): still processing, nothing paid again.
    assert helpers.sweep(shop.p, LATER + timedelta(minutes=20)).processed == []
    assert state(shop, rma) == "processing" and len(shop.stripe.creates("/v1/refunds")) == 1
    # On the board it waits for the provider, not among the stuck returns.
    board = shop.p.board(LATER + timedelta(minutes=21))
    assert (board.awaiting_provider, board.stuck) == ([rma], [])
    shop.stripe.settle(str(ref), "succeeded")
    report = helpers.sweep(shop.p, LATER + timedelta(minutes=40))
    assert report.processed == [rma] and state(shop, rma) == "completed" and "processed" in kinds(shop, rma)
    assert len(shop.stripe.creates("/v1/refunds")) == 1 and shop.stripe.refunded(ch) == 5350
    assert attempts(shop, rma)[0][4] == "succeeded"


def test_a_failed_refund_waits_in_review_and_an_operators_retry_pays_once(shop: Shop) -> None:
    ch = shop.stripe.add_payment(10700, refund_status="pending")
    buy(shop, "PAY-3", payment(provider="stripe", reference=ch.intent))
    rma, _ = ask_and_receive(shop, "PAY-3")
    [(_, _, ref, _, _)] = attempts(shop, rma)
    shop.stripe.settle(str(ref), "failed", "expired_or_canceled_card")
    helpers.sweep(shop.p, LATER + timedelta(minutes=20))
    assert state(shop, rma) == "review" and "review_needed" in kinds(shop, rma)
    with unit_of_work(shop.p.engine) as s:
        parked = s.scalars(select(Transition).where(Transition.to_state == State.REVIEW)
                           .order_by(Transition.id.desc())).first()  # type: ignore[union-attr]
        assert parked is not None and "expired_or_canceled_card" in str(parked.facts["error"])
    assert shop.p.board(LATER + timedelta(minutes=21)).counts.get("review") == 1
    # The sweep leaves it to a person: nothing is asked of Stripe again.
    helpers.sweep(shop.p, LATER + timedelta(hours=2))
    assert len(shop.stripe.creates("/v1/refunds")) == 1 and state(shop, rma) == "review"
    # The customer updated the card; an operator authorizes: a new attempt under a new key, paid once.
    ch.refund_status = "succeeded"
    out = stages.after_review(helpers.at(shop.p, LATER + timedelta(hours=3)), rma, True, "card updated",
                              Actor.operator("olga"))
    assert isinstance(out, Completed) and state(shop, rma) == "completed"
    [pid] = payment_ids(shop, "PAY-3")
    assert [(a[0], a[1], a[4]) for a in attempts(shop, rma)] == [(1, f"refund:{rma}:{pid}", "failed"),
                                                                 (2, f"refund:{rma}:{pid}:2", "succeeded")]
    assert shop.stripe.refunded(ch) == 5350


def test_a_refusal_parks_the_return_at_once_with_the_providers_reason(shop: Shop) -> None:
    ch = shop.stripe.add_payment(10700, refuse=(402, "card_error", "card_declined"))
    buy(shop, "PAY-4", payment(provider="stripe", reference=ch.intent))
    rma, out = ask_and_receive(shop, "PAY-4")
    assert isinstance(out, Moved) and out.state is State.REVIEW and state(shop, rma) == "review"
    [(_, _, ref, cents, status)] = attempts(shop, rma)
    assert (ref, cents, status) == (None, 5350, "failed") and shop.stripe.refunds == {}
    assert "review_needed" in kinds(shop, rma)


def test_a_timeout_after_stripe_paid_is_retried_and_pays_once(shop: Shop) -> None:
    ch = shop.stripe.add_payment(10700)
    buy(shop, "PAY-5", payment(provider="stripe", reference=ch.intent))
    shop.stripe.faults.extend(["drop", "drop", "drop"])  # the SDK's own retries meet it too
    with pytest.raises(TransientError):
        ask_and_receive(shop, "PAY-5")
    assert len(shop.stripe.refunds) == 1  # Stripe paid; we never heard
    rma = next(iter(shop.stripe.refunds.values()))["metadata"]["merchant_reference"].rsplit("-", 1)[0]
    assert state(shop, rma) == "processing" and attempts(shop, rma) == []
    report = helpers.sweep(shop.p, LATER + timedelta(minutes=20))
    assert report.processed == [rma] and shop.stripe.refunded(ch) == 5350 and len(shop.stripe.refunds) == 1


def test_payments_at_two_providers_are_each_refunded_at_their_own(shop: Shop) -> None:
    """R10 (most recent first) across providers: PayPal's 47.00 then Stripe's rest of 107.00."""
    ch = shop.stripe.add_payment(6000)
    cap = shop.paypal.add_capture(4700)
    buy(shop, "PAY-6", payment("60.00", provider="stripe", reference=ch.intent),
        payment("47.00", method="paypal", last4=None, provider="paypal", reference=cap.id,
                captured_at="2026-11-05T10:01:00-05:00"))
    rma, out = ask_and_receive(shop, "PAY-6", units=2)
    assert isinstance(out, Completed) and str(out.refund_total) == "107.00"
    assert (shop.paypal.refunded(cap), shop.stripe.refunded(ch)) == (4700, 6000)


def test_an_afterpay_order_is_refunded_at_afterpay(shop: Shop) -> None:
    order_ = shop.afterpay.add_order(10700)
    buy(shop, "PAY-7", payment(method="afterpay", last4=None, provider="afterpay", reference=order_.id))
    rma, out = ask_and_receive(shop, "PAY-7")
    assert isinstance(out, Completed)
    assert [r["amount"]["amount"] for r in order_.refunds] == ["53.50"]


def test_a_pending_refund_holds_its_payments_room_against_other_returns(shop: Shop) -> None:
    """Two payments, most recent first (R10): a pending refund on the newer one must count, or a second return
    would be allocated to it as well and the two together would exceed what it captured."""
    older = shop.stripe.add_payment(5350)
    newer = shop.stripe.add_payment(5350, refund_status="pending")
    buy(shop, "PAY-8", payment("53.50", provider="stripe", reference=older.intent),
        payment("53.50", provider="stripe", reference=newer.intent, captured_at="2026-11-05T10:01:00-05:00"))
    first, _ = ask_and_receive(shop, "PAY-8")
    assert shop.stripe.refunded(newer) == 5350
    second, out = ask_and_receive(shop, "PAY-8")
    assert isinstance(out, Moved) and out.state is State.RECEIVED  # waits while the first is being processed
    with unit_of_work(shop.p.engine) as s:  # as if a worker took it anyway: the plan must skip the newer payment
        s.execute(update(Return).where(Return.rma == second).values(state=State.PROCESSING))
    [alloc] = shop.p.plan_refund(second).allocations
    assert alloc.payment_id == payment_ids(shop, "PAY-8")[0]


# ---- reconciliation ----------------------------------------------------------------------------------------------


def period() -> tuple[datetime, datetime]:
    """The period around now: provider refunds are recorded at the machine's time, not the sample's."""
    now = datetime.now(UTC)
    return now - timedelta(days=1), now + timedelta(minutes=1)


def test_reconciliation_finds_nothing_when_both_sides_agree_and_each_kind_of_difference_when_not(shop: Shop) -> None:
    ch = shop.stripe.add_payment(10700)
    cap = shop.paypal.add_capture(10700)
    buy(shop, "PAY-R1", payment(provider="stripe", reference=ch.intent))
    buy(shop, "PAY-R2", payment(method="paypal", last4=None, provider="paypal", reference=cap.id))
    buy(shop, "PAY-R3", payment())  # the ledger: ours alone, nothing to compare
    ask_and_receive(shop, "PAY-R1", units=1)
    ask_and_receive(shop, "PAY-R1", units=1, at=LATER + timedelta(hours=1))
    ask_and_receive(shop, "PAY-R2")
    ask_and_receive(shop, "PAY-R3")
    before = helpers.row_counts(shop.p)
    assert reconcile(shop.p.engine, shop.p.providers, *period()) == []
    stripe_refs = sorted(shop.stripe.refunds)
    [paypal_ref] = shop.paypal.refunds
    shop.stripe.refunds[stripe_refs[0]]["amount"] = 5000  # amount differs
    del shop.stripe.refunds[stripe_refs[1]]  # missing at the provider
    shop.stripe.refunds["re_dashboard"] = {"id": "re_dashboard", "object": "refund", "amount": 100,
                                           "charge": ch.charge, "payment_intent": ch.intent,
                                           "status": "succeeded", "metadata": {}}  # made at Stripe, not by us
    shop.paypal.settle(paypal_ref, "CANCELLED")  # status differs
    found = {(d.provider, d.provider_ref, d.difference, d.ours, d.theirs)
             for d in reconcile(shop.p.engine, shop.p.providers, *period())}
    assert found == {("stripe", stripe_refs[0], "amount differs", "5350", "5000"),
                     ("stripe", stripe_refs[1], "missing at provider", "5350 succeeded", "-"),
                     ("stripe", "re_dashboard", "missing in our records", "-", "100 succeeded"),
                     ("paypal", paypal_ref, "status differs", "succeeded", "canceled")}
    assert helpers.row_counts(shop.p) == before  # it writes nothing
    # Outside the period nothing is compared.
    assert reconcile(shop.p.engine, shop.p.providers, period()[0] - timedelta(days=5),
                     period()[0] - timedelta(days=4)) == []


def test_a_return_parked_after_a_partial_payout_cannot_be_declined(shop: Shop) -> None:
    """Stripe refunded one payment and declined the other: the return waits in review with money already out. A
    decline there would tell the customer "no refund" after 53.50 reached them, and free the units (R11) for a
    second return that refunds them again; the operator is told why, and nothing changes."""
    older = shop.stripe.add_payment(5350, refuse=(402, "card_error", "card_declined"))
    newer = shop.stripe.add_payment(5350)
    buy(shop, "PAY-9", payment("53.50", provider="stripe", reference=older.intent),
        payment("53.50", provider="stripe", reference=newer.intent, captured_at="2026-11-05T10:01:00-05:00"))
    rma, out = ask_and_receive(shop, "PAY-9", units=2)
    assert isinstance(out, Moved) and out.state is State.REVIEW and shop.stripe.refunded(newer) == 5350
    before = helpers.row_counts(shop.p)
    with pytest.raises(InvalidInput, match=r"53\.50 .*already refunded.*authorize"):
        stages.after_review(helpers.at(shop.p, LATER + timedelta(hours=1)), rma, False, "no", Actor.operator("olga"))
    assert state(shop, rma) == "review" and helpers.row_counts(shop.p) == before
    # Once the card is fixed, the authorize pays the rest once and the return completes with both refunds.
    older.refuse = None
    done = stages.after_review(helpers.at(shop.p, LATER + timedelta(hours=2)), rma, True, "card updated",
                               Actor.operator("olga"))
    assert isinstance(done, Completed) and str(done.refund_total) == "107.00"
    assert (shop.stripe.refunded(older), shop.stripe.refunded(newer), len(shop.stripe.refunds)) == (5350, 5350, 2)


def test_a_pending_refund_that_failed_while_its_return_waited_in_review_is_retried_on_the_authorize(shop: Shop) \
        -> None:
    """One payment's refund declined (the return is parked), the other's pending; Stripe cancels the pending one
    while the return waits for a person. The operator's authorize makes both new attempts at once: it must not
    park the return a second time for a failure that happened before the person looked."""
    older = shop.stripe.add_payment(5350, refund_status="pending")
    newer = shop.stripe.add_payment(5350, refuse=(402, "card_error", "card_declined"))
    buy(shop, "PAY-10", payment("53.50", provider="stripe", reference=older.intent),
        payment("53.50", provider="stripe", reference=newer.intent, captured_at="2026-11-05T10:01:00-05:00"))
    rma, out = ask_and_receive(shop, "PAY-10", units=2)
    assert isinstance(out, Moved) and out.state is State.REVIEW
    [pending] = [r for r in shop.stripe.refunds.values() if r["status"] == "pending"]
    shop.stripe.settle(pending["id"], "canceled", "unknown")
    older.refund_status, newer.refuse = "succeeded", None
    done = stages.after_review(helpers.at(shop.p, LATER + timedelta(hours=2)), rma, True, "card updated",
                               Actor.operator("olga"))
    assert isinstance(done, Completed) and state(shop, rma) == "completed"
    assert (shop.stripe.refunded(older), shop.stripe.refunded(newer)) == (5350, 5350)
    assert sorted((a[0], a[4]) for a in attempts(shop, rma)) == [(1, "canceled"), (1, "failed"), (2, "succeeded"),
                                                                 (2, "succeeded")]
