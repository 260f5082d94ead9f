"""Policy conformance (docs/policy.md P1-P10, R1-R15) on the pure functions: facts built by hand, `now` a parameter.

Also the RMA number's check symbol and the lifecycle table (docs/architecture.md), which are pure too.
"""

from __future__ import annotations

import re
from collections import deque
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.errors import InvalidInput, InvalidTransition
from models.policy import (
    DEFAULT_POLICY,
    AuthorizedLine,
    Basis,
    Flag,
    LineDecision,
    LineFacts,
    OrderFacts,
    Outcome,
    PaymentFacts,
    Policy,
    Reason,
    ReceivedCounts,
    RequestedLine,
    Resolution,
    ReturnRequest,
    add_years,
    allocate_refund,
    deadline_flag,
    decide,
    overall,
    restocking_fee,
    settle,
    settle_line,
    validate_request,
)
from models.rma import ALPHABET, is_canonical, new_rma, parse_rma
from models.states import TERMINAL, TRANSITIONS, State, check_transition

P = DEFAULT_POLICY
D = Decimal
CENT = D("0.01")
PROPS = settings(derandomize=True, max_examples=200, deadline=None)


def t(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None
    return moment


def order(placed: str = "2026-11-05T10:00:00-05:00", delivered: str | None = "2026-11-08T12:00:00-05:00",
          channel: str = "direct") -> OrderFacts:
    return OrderFacts("IS-T1", channel, t(placed), t(delivered) if delivered else None)


def line(sku: str = "SKU-A", *, kind: str = "skincare", size: str = "retail", final_sale: bool = False,
         shipped: int = 3, available: int | None = None, price: str = "68.00", tax: str = "4.76",
         expires: date | None = date(2030, 12, 31)) -> LineFacts:
    return LineFacts(sku=sku, product_name=f"Product {sku}", kind=kind, size=size, final_sale=final_sale,
                     quantity_shipped=shipped, quantity_available=shipped if available is None else available,
                     unit_price=D(price), unit_tax=D(tax), expires_on=expires)


def ask(
    sku: str = "SKU-A", quantity: int = 1, *, unopened: bool = True, exchange_sku: str | None = None
) -> RequestedLine:
    return RequestedLine(sku, quantity, unopened, exchange_sku)


def one(o: OrderFacts, facts: LineFacts, now: str | datetime, *, reason: Reason = Reason.UNWANTED,
        resolution: Resolution | None = None, quantity: int = 1, unopened: bool = True,
        exchange_sku: str | None = None, exchange_price: str | None = None, policy: Policy = P) -> LineDecision:
    """Decide a one-line request through `decide` and return its only line."""
    res = resolution or {Reason.UNWANTED: Resolution.REFUND, Reason.DAMAGED: Resolution.REPLACEMENT,
                         Reason.SHIPPING_ERROR: Resolution.REPLACEMENT,
                         Reason.WRONG_PRODUCT: Resolution.EXCHANGE}[reason]
    request = ReturnRequest(reason, res, (ask(facts.sku, quantity, unopened=unopened, exchange_sku=exchange_sku),))
    prices = {exchange_sku: D(exchange_price) if exchange_price is not None else None} if exchange_sku else None
    moment = t(now) if isinstance(now, str) else now
    decision = decide(policy, o, {facts.sku: facts}, request, moment, prices)
    assert len(decision.lines) == 1
    assert decision.outcome is decision.lines[0].outcome  # R14 with one line
    return decision.lines[0]


def whole_cents(amount: Decimal) -> bool:
    return amount.as_tuple().exponent == -2


# ---- P1 ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", list(Reason))
def test_p1_partner_orders_are_declined_whatever_the_reason(reason: Reason) -> None:
    # Within every window (day 1, 1 hour after delivery): only the channel can decline it.
    o = order(placed="2026-11-18T10:00:00-05:00", delivered="2026-11-19T10:00:00-05:00", channel="partner")
    ld = one(o, line(), "2026-11-19T11:00:00-05:00", reason=reason,
             exchange_sku="SKU-B" if reason is Reason.WRONG_PRODUCT else None, exchange_price="68.00")
    assert ld.outcome is Outcome.DECLINED
    assert ld.clauses == ("P1",)
    assert ld.refund == D("0.00") and ld.restocking_fee == D("0.00")
    assert "partner" in ld.reason


# ---- P2 ----------------------------------------------------------------------------------------------------

P2_ITEMS = [
    pytest.param(dict(kind="tshirt"), id="tshirt"),
    pytest.param(dict(kind="trial_kit", size="travel"), id="trial_kit"),
    pytest.param(dict(kind="sample", size="travel"), id="sample"),
    pytest.param(dict(final_sale=True), id="final_sale"),
]


@pytest.mark.parametrize("item", P2_ITEMS)
@pytest.mark.parametrize("reason", [Reason.UNWANTED, Reason.WRONG_PRODUCT])
def test_p2_non_returnable_items_are_declined(item: dict[str, object], reason: Reason) -> None:
    ld = one(order(), line(**item), "2026-11-09T10:00:00-05:00", reason=reason,  # type: ignore[arg-type]
             exchange_sku="SKU-B" if reason is Reason.WRONG_PRODUCT else None, exchange_price="10.00")
    assert ld.outcome is Outcome.DECLINED
    assert ld.clauses == ("P2",)
    assert ld.refund == D("0.00")


@pytest.mark.parametrize("item", P2_ITEMS)
@pytest.mark.parametrize("reason", [Reason.DAMAGED, Reason.SHIPPING_ERROR])
@pytest.mark.parametrize("resolution", [Resolution.REPLACEMENT, Resolution.REFUND])
def test_p2_items_damaged_or_misshipped_are_authorized_under_p5(
    item: dict[str, object], reason: Reason, resolution: Resolution
) -> None:
    # Our ruling (decide_line): the shop's own error is governed by P5 whatever the item is.
    facts = line(**item, price="25.00", tax="1.75")  # type: ignore[arg-type]
    ld = one(order(), facts, "2026-11-09T10:00:00-05:00", reason=reason, resolution=resolution, quantity=2,
             unopened=False)
    assert ld.outcome is Outcome.AUTHORIZED
    assert ld.basis is Basis.DAMAGE
    assert "P2" not in ld.clauses and "P5" in ld.clauses
    assert ld.refund == (D("53.50") if resolution is Resolution.REFUND else D("0.00"))
    assert ld.restocking_fee == D("0.00")


# ---- P3 / R1: the 30 days, counted in New York calendar dates ------------------------------------------------------

R1_CASES = [
    # placed Oct 1 in New York (Oct 2 in UTC): day 30 is Oct 31 local, day 31 starts at local midnight
    ("2026-10-01T23:30:00-04:00", "2026-10-31T23:59:59-04:00", Basis.FULL_REFUND),
    ("2026-10-01T23:30:00-04:00", "2026-11-01T03:59:59+00:00", Basis.FULL_REFUND),  # same local day, given in UTC
    ("2026-10-01T23:30:00-04:00", "2026-11-01T00:00:00-04:00", Basis.LATE_RETURN),  # UTC dates would say day 30
    ("2026-10-01T23:30:00-04:00", "2026-11-01T04:00:00+00:00", Basis.LATE_RETURN),
    # across the end of daylight saving time (2026-11-01 02:00 EDT -> 01:00 EST)
    ("2026-10-02T22:00:00-04:00", "2026-11-01T23:30:00-05:00", Basis.FULL_REFUND),
    ("2026-10-02T22:00:00-04:00", "2026-11-02T00:10:00-05:00", Basis.LATE_RETURN),  # elapsed 30 d 3 h; local day 31
    # across the start of daylight saving time (2027-03-14 02:00 EST -> 03:00 EDT)
    ("2027-02-12T23:30:00-05:00", "2027-03-14T23:59:00-04:00", Basis.FULL_REFUND),
    ("2027-02-12T23:30:00-05:00", "2027-03-15T00:00:00-04:00", Basis.LATE_RETURN),  # UTC dates would say day 30
    # the day of purchase itself
    ("2026-11-05T10:00:00-05:00", "2026-11-05T10:00:01-05:00", Basis.FULL_REFUND),
]


@pytest.mark.parametrize(("placed", "now", "basis"), R1_CASES)
def test_r1_day_30_is_a_full_refund_and_day_31_a_late_return(placed: str, now: str, basis: Basis) -> None:
    ld = one(order(placed=placed, delivered=None), line(expires=date(2031, 1, 1)), now, quantity=2)
    assert ld.outcome is Outcome.AUTHORIZED
    assert ld.basis is basis
    if basis is Basis.FULL_REFUND:
        assert ld.clauses == ("P3", "R1", "R3")
        assert (ld.refund, ld.restocking_fee) == (D("145.52"), D("0.00"))
    else:
        assert ld.clauses == ("P4", "R2", "R4")
        assert (ld.refund, ld.restocking_fee) == (D("118.32"), D("27.20"))


def test_r1_day_count_uses_the_shops_zone_even_when_facts_arrive_in_utc() -> None:
    placed_utc = t("2026-10-01T23:30:00-04:00").astimezone(UTC)  # 2026-10-02T03:30Z
    o = OrderFacts("IS-T1", "direct", placed_utc, None)
    assert one(o, line(), "2026-10-31T23:00:00-04:00").basis is Basis.FULL_REFUND
    assert one(o, line(), "2026-11-01T00:30:00-04:00").basis is Basis.LATE_RETURN


# ---- R2: the expiry rule for P4 --------------------------------------------------------------------------------------


def test_r2_expiry_exactly_one_year_after_the_local_request_date_passes() -> None:
    # 23:30 in New York on Nov 20 is Nov 21 in UTC: the request date is Nov 20.
    ld = one(order(placed="2026-09-01T10:00:00-04:00"), line(expires=date(2027, 11, 20)), "2026-11-20T23:30:00-05:00")
    assert ld.outcome is Outcome.AUTHORIZED and ld.basis is Basis.LATE_RETURN


def test_r2_expiry_one_day_short_of_a_year_is_declined() -> None:
    ld = one(order(placed="2026-09-01T10:00:00-04:00"), line(expires=date(2027, 11, 19)), "2026-11-20T23:30:00-05:00")
    assert ld.outcome is Outcome.DECLINED
    assert ld.clauses == ("P4", "R2")
    assert ld.refund == D("0.00")
    assert "2027-11-20" in ld.reason and "2027-11-19" in ld.reason


def test_r2_feb_29_request_needs_expiry_on_feb_28_next_year() -> None:
    o = order(placed="2027-12-01T10:00:00-05:00")
    now = "2028-02-29T12:00:00-05:00"
    assert one(o, line(expires=date(2029, 2, 28)), now).outcome is Outcome.AUTHORIZED
    assert one(o, line(expires=date(2029, 2, 27)), now).outcome is Outcome.DECLINED


@pytest.mark.parametrize(("day", "years", "expected"), [
    (date(2028, 2, 29), 1, date(2029, 2, 28)),
    (date(2028, 2, 29), 4, date(2032, 2, 29)),
    (date(2027, 2, 28), 1, date(2028, 2, 28)),
    (date(2026, 11, 20), 1, date(2027, 11, 20)),
    (date(2026, 12, 31), 1, date(2027, 12, 31)),
])
def test_add_years(day: date, years: int, expected: date) -> None:
    assert add_years(day, years) == expected


def test_r2_no_expiry_recorded_goes_to_review_with_the_amounts_it_would_earn() -> None:
    ld = one(order(placed="2026-09-01T10:00:00-04:00"), line(expires=None, price="72.00", tax="5.04"),
             "2026-11-20T10:00:00-05:00")
    assert ld.outcome is Outcome.REVIEW
    assert ld.basis is Basis.LATE_RETURN
    assert ld.clauses == ("P4", "R2")
    assert (ld.refund, ld.restocking_fee) == (D("62.64"), D("14.40"))


def test_r2_no_expiry_within_30_days_is_irrelevant() -> None:
    ld = one(order(), line(expires=None), "2026-11-20T10:00:00-05:00")
    assert ld.outcome is Outcome.AUTHORIZED and ld.basis is Basis.FULL_REFUND


# ---- R3 / R4: the amounts ----------------------------------------------------------------------------------


def test_r3_full_refund_is_price_plus_tax_for_the_units() -> None:
    ld = one(order(), line(price="19.99", tax="1.40"), "2026-11-20T10:00:00-05:00", quantity=3)
    assert (ld.refund, ld.restocking_fee) == (D("64.17"), D("0.00"))
    assert whole_cents(ld.refund)


def test_r4_fee_is_20_percent_of_price_tax_excluded() -> None:
    ld = one(order(placed="2026-09-01T10:00:00-04:00"), line(price="10.00", tax="5.00"), "2026-11-20T10:00:00-05:00")
    assert ld.restocking_fee == D("2.00")  # not 20 % of 15.00
    assert ld.refund == D("13.00")


def test_r4_fee_is_computed_on_the_line_total_not_per_unit() -> None:
    # 3 x 0.33 = 0.99; 20 % = 0.198 -> 0.20 (per unit: 0.066 -> 0.07, x 3 = 0.21)
    ld = one(order(placed="2026-09-01T10:00:00-04:00"), line(price="0.33", tax="0.02"), "2026-11-20T10:00:00-05:00",
             quantity=3)
    assert ld.restocking_fee == D("0.20")
    assert ld.refund == D("0.85")  # 0.99 + 0.06 - 0.20


@pytest.mark.parametrize(("price", "half_up", "half_even"), [
    ("0.125", "0.03", "0.02"),    # 0.025
    ("10.125", "2.03", "2.02"),   # 2.025
    ("0.225", "0.05", "0.04"),    # 0.045
])
def test_r4_fee_rounds_half_up(price: str, half_up: str, half_even: str) -> None:
    exact = D(price) * D("0.20")
    assert exact.quantize(CENT, rounding=ROUND_HALF_EVEN) == D(half_even)  # the case really discriminates
    assert restocking_fee(P, D(price)) == D(half_up)


@pytest.mark.parametrize(("price", "fee"), [("0.10", "0.03"), ("0.50", "0.13"), ("4.10", "1.03")])
def test_r4_half_cent_fee_on_a_whole_cent_line_rounds_up(price: str, fee: str) -> None:
    # At 20 % a whole-cent price never makes a half cent; the rate is configuration (a shop may choose 25 %).
    policy = Policy(restocking_fee_rate=D("0.25"))
    ld = one(order(placed="2026-09-01T10:00:00-04:00"), line(price=price, tax="0.00"), "2026-11-20T10:00:00-05:00",
             policy=policy)
    assert ld.restocking_fee == D(fee)
    assert ld.refund == D(price) - D(fee)


# ---- R5 and "unopened" -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["travel", "professional"])
@pytest.mark.parametrize("placed", ["2026-11-15T10:00:00-05:00", "2026-09-01T10:00:00-04:00"])
def test_r5_only_retail_sizes_are_returnable(size: str, placed: str) -> None:
    ld = one(order(placed=placed), line(size=size), "2026-11-20T10:00:00-05:00")
    assert ld.outcome is Outcome.DECLINED
    assert ld.clauses == ("P3", "R5")
    assert size in ld.reason


@pytest.mark.parametrize("placed", ["2026-11-15T10:00:00-05:00", "2026-09-01T10:00:00-04:00"])
def test_opened_items_are_declined_for_standard_returns(placed: str) -> None:
    ld = one(order(placed=placed), line(), "2026-11-20T10:00:00-05:00", unopened=False)
    assert ld.outcome is Outcome.DECLINED
    assert ld.clauses == ("P3",)
    assert ld.refund == D("0.00")


# ---- P5 / R6 / R15 --------------------------------------------------------------------------------------------

DELIVERED = "2026-11-18T14:00:00-05:00"


@pytest.mark.parametrize("reason", [Reason.DAMAGED, Reason.SHIPPING_ERROR])
def test_p5_exactly_48_hours_after_delivery_is_in_time(reason: Reason) -> None:
    now = t(DELIVERED) + timedelta(hours=48)
    ld = one(order(delivered=DELIVERED), line(), now, reason=reason, unopened=False)
    assert ld.outcome is Outcome.AUTHORIZED
    assert ld.basis is Basis.DAMAGE
    assert ld.clauses == ("P5", "R6")


@pytest.mark.parametrize("reason", [Reason.DAMAGED, Reason.SHIPPING_ERROR])
def test_p5_one_second_past_48_hours_is_declined_with_the_standard_return_hint(reason: Reason) -> None:
    now = t(DELIVERED) + timedelta(hours=48, seconds=1)
    ld = one(order(delivered=DELIVERED), line(), now, reason=reason, resolution=Resolution.REFUND)
    assert ld.outcome is Outcome.DECLINED
    assert ld.clauses == ("P5", "R6")
    assert ld.refund == D("0.00")
    assert "standard return" in ld.reason.lower()
    assert "P3/P4" in ld.reason


def test_p5_window_is_elapsed_time_across_the_dst_change() -> None:
    # Oct 31 12:00 EDT -> Nov 2 11:00 EST is exactly 48 h (the wall clock says 47 h).
    o = order(placed="2026-10-28T10:00:00-04:00", delivered="2026-10-31T12:00:00-04:00")
    assert one(o, line(), "2026-11-02T11:00:00-05:00", reason=Reason.DAMAGED).outcome is Outcome.AUTHORIZED
    assert one(o, line(), "2026-11-02T11:00:01-05:00", reason=Reason.DAMAGED).outcome is Outcome.DECLINED


@pytest.mark.parametrize(("resolution", "refund"), [(Resolution.REFUND, "145.52"), (Resolution.REPLACEMENT, "0.00")])
def test_r6_refund_or_replacement_amounts_and_no_fee(resolution: Resolution, refund: str) -> None:
    ld = one(order(delivered=DELIVERED), line(), "2026-11-19T09:00:00-05:00", reason=Reason.DAMAGED,
             resolution=resolution, quantity=2, unopened=False)
    assert ld.outcome is Outcome.AUTHORIZED
    assert (ld.refund, ld.restocking_fee) == (D(refund), D("0.00"))


def test_r6_damage_claim_ignores_size_and_age_rules() -> None:
    # A professional size, opened, bought 60 days ago, delivered yesterday (back-order): P5 still applies.
    o = order(placed="2026-09-21T10:00:00-04:00", delivered="2026-11-19T09:00:00-05:00")
    ld = one(o, line(size="professional", expires=None), "2026-11-20T10:00:00-05:00", reason=Reason.SHIPPING_ERROR,
             unopened=False)
    assert ld.outcome is Outcome.AUTHORIZED and ld.basis is Basis.DAMAGE


@pytest.mark.parametrize(("resolution", "refund"), [(Resolution.REFUND, "72.76"), (Resolution.REPLACEMENT, "0.00")])
def test_r15_damage_claim_without_a_delivery_time_goes_to_review(resolution: Resolution, refund: str) -> None:
    o = order(delivered=None)
    request = ReturnRequest(Reason.DAMAGED, resolution, (ask("SKU-A", 1, unopened=False),))
    decision = decide(P, o, {"SKU-A": line()}, request, t("2026-11-20T10:00:00-05:00"))
    assert decision.outcome is Outcome.REVIEW
    ld = decision.lines[0]
    assert ld.outcome is Outcome.REVIEW
    assert ld.clauses == ("P5", "R15")
    assert (ld.refund, ld.restocking_fee) == (D(refund), D("0.00"))
    assert decision.prepaid_label is True


def test_r6_prepaid_label_only_for_the_shops_errors() -> None:
    lines = {"SKU-A": line()}
    now = t("2026-11-19T09:00:00-05:00")
    for reason, res, prepaid in [(Reason.DAMAGED, Resolution.REPLACEMENT, True),
                                 (Reason.SHIPPING_ERROR, Resolution.REFUND, True),
                                 (Reason.UNWANTED, Resolution.REFUND, False)]:
        d = decide(P, order(delivered=DELIVERED), lines, ReturnRequest(reason, res, (ask(),)), now)
        assert d.prepaid_label is prepaid


# ---- P6 / R7 -----------------------------------------------------------------------------------------------------

EXCHANGE_ORDER = "2026-10-01T23:30:00-04:00"


def exchange(now: str, *, price: str | None = "38.00", unopened: bool = True, quantity: int = 1) -> LineDecision:
    return one(order(placed=EXCHANGE_ORDER), line(price="42.00", tax="2.94"), now, reason=Reason.WRONG_PRODUCT,
               exchange_sku="SKU-B", exchange_price=price, unopened=unopened, quantity=quantity)


def test_p6_day_30_exchange_refunds_the_price_difference_when_cheaper() -> None:
    ld = exchange("2026-10-31T23:59:00-04:00", quantity=2)
    assert ld.outcome is Outcome.AUTHORIZED
    assert ld.basis is Basis.EXCHANGE
    assert ld.clauses == ("P6", "R7")
    assert (ld.refund, ld.restocking_fee) == (D("8.00"), D("0.00"))
    assert ld.exchange_sku == "SKU-B"


def test_p6_day_31_is_declined() -> None:
    ld = exchange("2026-11-01T00:00:00-04:00")
    assert ld.outcome is Outcome.DECLINED
    assert ld.clauses == ("P6",)
    assert ld.refund == D("0.00")


def test_p6_opened_wrong_item_is_declined() -> None:
    ld = exchange("2026-10-10T10:00:00-04:00", unopened=False)
    assert ld.outcome is Outcome.DECLINED
    assert ld.clauses == ("P6", "R7")


def test_r7_dearer_correct_item_goes_to_review() -> None:
    ld = exchange("2026-10-10T10:00:00-04:00", price="42.01")
    assert ld.outcome is Outcome.REVIEW
    assert ld.basis is Basis.EXCHANGE
    assert ld.refund == D("0.00")


@pytest.mark.parametrize("price", ["42.00", None])
def test_r7_same_price_or_unknown_price_is_an_even_exchange(price: str | None) -> None:
    ld = exchange("2026-10-10T10:00:00-04:00", price=price)
    assert ld.outcome is Outcome.AUTHORIZED
    assert ld.refund == D("0.00")


# ---- R14 -----------------------------------------------------------------------------------------------------


def _ld(outcome: Outcome) -> LineDecision:
    return LineDecision("X", 1, outcome, Basis.NONE, (), "", D("0.00"), D("0.00"))


@pytest.mark.parametrize(("outcomes", "expected"), [
    ((Outcome.DECLINED,), Outcome.DECLINED),
    ((Outcome.DECLINED, Outcome.DECLINED), Outcome.DECLINED),
    ((Outcome.AUTHORIZED,), Outcome.AUTHORIZED),
    ((Outcome.DECLINED, Outcome.AUTHORIZED), Outcome.AUTHORIZED),
    ((Outcome.AUTHORIZED, Outcome.REVIEW), Outcome.REVIEW),
    ((Outcome.DECLINED, Outcome.REVIEW), Outcome.REVIEW),
    ((Outcome.DECLINED, Outcome.AUTHORIZED, Outcome.REVIEW), Outcome.REVIEW),
])
def test_r14_overall(outcomes: tuple[Outcome, ...], expected: Outcome) -> None:
    assert overall(tuple(_ld(o) for o in outcomes)) is expected


def test_r14_mixed_request_covers_only_authorized_lines_and_lists_declined_ones() -> None:
    lines = {"SKU-A": line("SKU-A"), "SKU-T": line("SKU-T", kind="tshirt", price="25.00", tax="1.75")}
    req = ReturnRequest(Reason.UNWANTED, Resolution.REFUND, (ask("SKU-A", 2), ask("SKU-T", 1)))
    d = decide(P, order(), lines, req, t("2026-11-20T10:00:00-05:00"))
    assert d.outcome is Outcome.AUTHORIZED
    assert [ln.outcome for ln in d.lines] == [Outcome.AUTHORIZED, Outcome.DECLINED]
    assert [ln.sku for ln in d.authorized_lines] == ["SKU-A"]
    assert d.refund_total == D("145.52")
    assert d.clauses == ("P2", "P3", "R1", "R3", "R14")
    assert d.as_dict()["lines"][1]["reason"]  # the declined line says why


def test_r14_review_beats_authorized_and_covers_both() -> None:
    lines = {"SKU-A": line("SKU-A"), "SKU-N": line("SKU-N", expires=None, price="10.00", tax="0.70")}
    req = ReturnRequest(Reason.UNWANTED, Resolution.REFUND, (ask("SKU-A"), ask("SKU-N")))
    d = decide(P, order(placed="2026-09-01T10:00:00-04:00"), lines, req, t("2026-11-20T10:00:00-05:00"))
    assert d.outcome is Outcome.REVIEW
    assert [ln.outcome for ln in d.lines] == [Outcome.AUTHORIZED, Outcome.REVIEW]
    assert d.refund_total == D("59.16") + D("8.70")  # both lines an operator may authorize


def test_decide_refuses_a_naive_now() -> None:
    with pytest.raises(InvalidInput):
        decide(P, order(), {"SKU-A": line()}, ReturnRequest(Reason.UNWANTED, Resolution.REFUND, (ask(),)),
               datetime(2026, 11, 20, 10, 0))


# ---- R11 and request validation --------------------------------------------------------------------------------

KNOWN = frozenset({"SKU-A", "SKU-B", "SKU-X"})


def validate(*lines: RequestedLine, reason: Reason = Reason.UNWANTED, resolution: Resolution = Resolution.REFUND,
             available: int = 2) -> None:
    validate_request(ReturnRequest(reason, resolution, lines),
                     {"SKU-A": line("SKU-A", available=available), "SKU-B": line("SKU-B")}, KNOWN)


def test_r11_quantity_up_to_what_is_left_is_valid() -> None:
    validate(ask("SKU-A", 2), available=2)


def test_r11_quantity_beyond_what_is_left_is_invalid() -> None:
    with pytest.raises(InvalidInput, match="R11"):
        validate(ask("SKU-A", 3), available=2)
    with pytest.raises(InvalidInput, match="R11"):
        validate(ask("SKU-A", 1), available=0)


@pytest.mark.parametrize(("lines", "reason", "resolution", "message"), [
    ((ask("SKU-Q"),), Reason.UNWANTED, Resolution.REFUND, "unknown sku"),
    ((ask("SKU-X"),), Reason.UNWANTED, Resolution.REFUND, "not on this order"),
    ((ask("SKU-A"), ask("SKU-A")), Reason.UNWANTED, Resolution.REFUND, "twice"),
    ((ask("SKU-A"),), Reason.UNWANTED, Resolution.REPLACEMENT, "does not apply"),
    ((ask("SKU-A"),), Reason.UNWANTED, Resolution.EXCHANGE, "does not apply"),
    ((ask("SKU-A"),), Reason.DAMAGED, Resolution.EXCHANGE, "does not apply"),
    ((ask("SKU-A", exchange_sku="SKU-B"),), Reason.WRONG_PRODUCT, Resolution.REFUND, "does not apply"),
    ((ask("SKU-A"),), Reason.WRONG_PRODUCT, Resolution.EXCHANGE, "exchange_sku"),
    ((ask("SKU-A", exchange_sku="SKU-Q"),), Reason.WRONG_PRODUCT, Resolution.EXCHANGE, "unknown exchange_sku"),
    ((ask("SKU-A", exchange_sku="SKU-B"),), Reason.UNWANTED, Resolution.REFUND, "exchange_sku"),
    ((), Reason.UNWANTED, Resolution.REFUND, "at least one line"),
])
def test_invalid_requests_are_refused(lines: tuple[RequestedLine, ...], reason: Reason, resolution: Resolution,
                                      message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        validate(*lines, reason=reason, resolution=resolution)


@pytest.mark.parametrize(("reason", "resolution"), [
    (Reason.UNWANTED, Resolution.REFUND), (Reason.DAMAGED, Resolution.REPLACEMENT),
    (Reason.DAMAGED, Resolution.REFUND), (Reason.SHIPPING_ERROR, Resolution.REPLACEMENT),
    (Reason.SHIPPING_ERROR, Resolution.REFUND),
])
def test_allowed_resolutions_validate(reason: Reason, resolution: Resolution) -> None:
    validate(ask("SKU-A"), reason=reason, resolution=resolution)
    validate(ask("SKU-A", exchange_sku="SKU-B"), reason=Reason.WRONG_PRODUCT, resolution=Resolution.EXCHANGE)


# ---- R12: settlement at receipt ------------------------------------------------------------------------------


def auth(basis: Basis, quantity: int = 3, price: str = "10.00", tax: str = "0.70", authorized: str = "0.00",
         sku: str = "SKU-A") -> AuthorizedLine:
    return AuthorizedLine(sku, quantity, basis, D(price), D(tax), D(authorized), "SKU-B" if basis is Basis.EXCHANGE
                          else None)


def test_r12_opened_and_missing_units_earn_nothing_on_p3() -> None:
    s = settle_line(P, auth(Basis.FULL_REFUND), ReceivedCounts(unopened=1, opened=1, missing=1), Resolution.REFUND)
    assert not s.review
    assert (s.refund, s.restocking_fee, s.refunded_units) == (D("10.70"), D("0.00"), 1)
    assert "R12" in s.clauses


def test_r12_p4_fee_applies_to_the_refunded_units_only() -> None:
    s = settle_line(P, auth(Basis.LATE_RETURN), ReceivedCounts(unopened=2, opened=1), Resolution.REFUND)
    assert (s.refund, s.restocking_fee, s.refunded_units) == (D("17.40"), D("4.00"), 2)


@pytest.mark.parametrize("basis", [Basis.FULL_REFUND, Basis.LATE_RETURN])
def test_r12_damaged_in_transit_back_goes_to_review(basis: Basis) -> None:
    s = settle(P, (auth(basis),), {"SKU-A": ReceivedCounts(unopened=2, damaged=1)}, Resolution.REFUND)
    assert s.review
    assert s.refund_total == D("0.00")


@pytest.mark.parametrize(("basis", "refund", "fee"), [
    (Basis.FULL_REFUND, "32.10", "0.00"),   # all three units as if unopened
    (Basis.LATE_RETURN, "26.10", "6.00"),
])
def test_r12_approved_damaged_units_are_refunded(basis: Basis, refund: str, fee: str) -> None:
    s = settle(P, (auth(basis),), {"SKU-A": ReceivedCounts(unopened=2, damaged=1)}, Resolution.REFUND, approved=True)
    assert not s.review
    assert s.lines[0].refunded_units == 3
    assert (s.refund_total, s.lines[0].restocking_fee) == (D(refund), D(fee))


def test_r12_approved_does_not_pay_for_opened_or_missing_units() -> None:
    s = settle(P, (auth(Basis.FULL_REFUND),), {"SKU-A": ReceivedCounts(damaged=1, opened=1, missing=1)},
               Resolution.REFUND, approved=True)
    assert s.refund_total == D("10.70")


def test_r6_damage_refund_pays_arrived_units_whatever_their_condition() -> None:
    s = settle_line(P, auth(Basis.DAMAGE), ReceivedCounts(opened=1, damaged=1, missing=1), Resolution.REFUND)
    assert (s.refund, s.restocking_fee, s.refunded_units, s.review) == (D("21.40"), D("0.00"), 2, False)


def test_r15_replacement_ships_arrived_units_and_refunds_nothing() -> None:
    s = settle_line(P, auth(Basis.DAMAGE), ReceivedCounts(unopened=1, damaged=2), Resolution.REPLACEMENT)
    assert (s.refund, s.replacement_units, s.review) == (D("0.00"), 3, False)


def test_r7_exchange_settles_the_difference_per_unopened_unit_and_reviews_opened_ones() -> None:
    line_ = auth(Basis.EXCHANGE, quantity=2, authorized="8.00")
    sound = settle_line(P, line_, ReceivedCounts(unopened=2), Resolution.EXCHANGE)
    assert (sound.refund, sound.replacement_units, sound.review) == (D("8.00"), 2, False)
    partial = settle_line(P, line_, ReceivedCounts(unopened=1, missing=1), Resolution.EXCHANGE)
    assert (partial.refund, partial.replacement_units) == (D("4.00"), 1)
    opened = settle_line(P, line_, ReceivedCounts(unopened=1, opened=1), Resolution.EXCHANGE)
    assert opened.review and opened.refund == D("0.00")
    approved = settle_line(P, line_, ReceivedCounts(unopened=1, opened=1), Resolution.EXCHANGE, approved=True)
    assert (approved.review, approved.refund, approved.replacement_units) == (False, D("8.00"), 2)


def test_settle_refuses_wrong_counts() -> None:
    with pytest.raises(InvalidInput, match="units counted"):
        settle(P, (auth(Basis.FULL_REFUND),), {"SKU-A": ReceivedCounts(unopened=2)}, Resolution.REFUND)
    with pytest.raises(InvalidInput, match="no counts"):
        settle(P, (auth(Basis.FULL_REFUND),), {}, Resolution.REFUND)
    with pytest.raises(InvalidInput, match="not on the RMA"):
        settle(P, (auth(Basis.FULL_REFUND),), {"SKU-A": ReceivedCounts(unopened=3), "SKU-Z": ReceivedCounts()},
               Resolution.REFUND)
    with pytest.raises(InvalidInput):
        settle_line(P, auth(Basis.NONE, quantity=1), ReceivedCounts(unopened=1), Resolution.REFUND)


# ---- R10: refunds to payments --------------------------------------------------------------------------------


def pay(pid: int, captured: str, at: str, refunded: str = "0.00") -> PaymentFacts:
    return PaymentFacts(pid, "visa", "4242", D(captured), D(refunded), t(at))


def test_r10_most_recent_payment_first() -> None:
    payments = [pay(1, "100.00", "2026-11-01T10:00:00-05:00"), pay(2, "50.00", "2026-11-02T10:00:00-05:00")]
    assert [(a.payment_id, a.amount) for a in allocate_refund(D("70.00"), payments)] == [(2, D("50.00")),
                                                                                       (1, D("20.00"))]
    assert [(a.payment_id, a.amount) for a in allocate_refund(D("30.00"), payments)] == [(2, D("30.00"))]


def test_r10_never_beyond_captured_minus_refunded() -> None:
    payments = [pay(1, "100.00", "2026-11-01T10:00:00-05:00", refunded="90.00"),
                pay(2, "50.00", "2026-11-02T10:00:00-05:00", refunded="30.00")]
    assert [(a.payment_id, a.amount) for a in allocate_refund(D("30.00"), payments)] == [(2, D("20.00")),
                                                                                       (1, D("10.00"))]
    with pytest.raises(InvalidInput):
        allocate_refund(D("30.01"), payments)


def test_r10_zero_and_negative() -> None:
    assert allocate_refund(D("0.00"), [pay(1, "10.00", "2026-11-01T10:00:00-05:00")]) == ()
    with pytest.raises(InvalidInput):
        allocate_refund(D("-0.01"), [pay(1, "10.00", "2026-11-01T10:00:00-05:00")])
    with pytest.raises(InvalidInput):
        allocate_refund(D("0.01"), [])


def test_r10_order_is_by_capture_time_not_by_zone_or_id() -> None:
    # Payment 1 is later in absolute time even though its local wall clock reads earlier.
    payments = [pay(1, "10.00", "2026-11-02T09:00:00-08:00"), pay(2, "10.00", "2026-11-02T11:00:00-05:00")]
    assert allocate_refund(D("5.00"), payments)[0].payment_id == 1


# ---- R9, R8 ---------------------------------------------------------------------------------------------------


def test_r9_deadline_flag_boundaries() -> None:
    received = t("2026-11-24T09:00:00-05:00")
    deadline = P.processing_deadline(received)
    assert deadline == received + timedelta(days=10)
    assert deadline_flag(P, deadline, deadline - timedelta(hours=48, seconds=1)) is Flag.ON_TIME
    assert deadline_flag(P, deadline, deadline - timedelta(hours=48)) is Flag.DUE_SOON
    assert deadline_flag(P, deadline, deadline - timedelta(seconds=1)) is Flag.DUE_SOON
    assert deadline_flag(P, deadline, deadline) is Flag.OVERDUE
    assert deadline_flag(P, deadline, deadline + timedelta(days=3)) is Flag.OVERDUE
    assert deadline_flag(P, deadline, received) is Flag.ON_TIME


def test_r8_rma_valid_for_30_days() -> None:
    issued = t("2026-11-20T10:00:00-05:00")
    assert P.rma_valid_until(issued) == issued + timedelta(days=30)


# ---- properties --------------------------------------------------------------------------------------------------

BASE = datetime(2026, 1, 1, tzinfo=UTC)
cents = st.integers(min_value=0, max_value=100_000).map(lambda c: D(c) / 100)
reason_resolution = st.sampled_from([
    (Reason.UNWANTED, Resolution.REFUND), (Reason.DAMAGED, Resolution.REPLACEMENT), (Reason.DAMAGED, Resolution.REFUND),
    (Reason.SHIPPING_ERROR, Resolution.REPLACEMENT), (Reason.SHIPPING_ERROR, Resolution.REFUND),
    (Reason.WRONG_PRODUCT, Resolution.EXCHANGE),
])


@st.composite
def cases(draw: st.DrawFn) -> tuple[OrderFacts, LineFacts, ReturnRequest, datetime, Decimal | None]:
    placed = BASE + timedelta(seconds=draw(st.integers(0, 3 * 365 * 86400)))
    delivered = draw(st.one_of(st.none(), st.integers(0, 20 * 86400).map(lambda s: placed + timedelta(seconds=s))))
    now = placed + timedelta(seconds=draw(st.integers(0, 400 * 86400)))
    shipped = draw(st.integers(1, 12))
    expires = draw(st.one_of(st.none(), st.integers(-400, 1500).map(lambda d: now.date() + timedelta(days=d))))
    facts = LineFacts(
        sku="SKU-A", product_name="A",
        kind=draw(st.sampled_from(["skincare", "skincare", "tshirt", "sample", "other"])),
        size=draw(st.sampled_from(["retail", "retail", "travel", "professional"])), final_sale=draw(st.booleans()),
        quantity_shipped=shipped, quantity_available=shipped, unit_price=draw(cents), unit_tax=draw(cents),
        expires_on=expires,
    )
    reason, resolution = draw(reason_resolution)
    exchange = "SKU-B" if reason is Reason.WRONG_PRODUCT else None
    request = ReturnRequest(reason, resolution, (RequestedLine("SKU-A", draw(st.integers(1, shipped)),
                                                               draw(st.booleans()), exchange),))
    o = OrderFacts("IS-P", draw(st.sampled_from(["direct", "direct", "partner"])), placed, delivered)
    exchange_price = draw(st.one_of(st.none(), cents)) if exchange else None
    return o, facts, request, now, exchange_price


@PROPS
@given(cases())
def test_property_refund_is_bounded_whole_cents_and_fee_only_on_p4(
    case: tuple[OrderFacts, LineFacts, ReturnRequest, datetime, Decimal | None],
) -> None:
    o, facts, request, now, exchange_price = case
    d = decide(P, o, {"SKU-A": facts}, request, now, {"SKU-B": exchange_price} if exchange_price is not None else None)
    ld = d.lines[0]
    qty = request.lines[0].quantity
    price = (facts.unit_price * qty).quantize(CENT)
    tax = (facts.unit_tax * qty).quantize(CENT)
    assert whole_cents(ld.refund) and whole_cents(ld.restocking_fee)
    assert D("0.00") <= ld.refund <= price + tax
    if ld.basis is Basis.EXCHANGE:
        assert ld.refund <= price
    if ld.basis is Basis.LATE_RETURN:
        assert ld.restocking_fee == (price * D("0.20")).quantize(CENT, rounding=ROUND_HALF_UP)
        assert ld.refund == price + tax - ld.restocking_fee
    else:
        assert ld.restocking_fee == D("0.00")
    if ld.basis is Basis.FULL_REFUND:
        assert ld.refund == price + tax
    if ld.outcome is Outcome.DECLINED:
        assert ld.refund == D("0.00") and ld.basis is Basis.NONE
    if o.channel != "direct":
        assert ld.clauses == ("P1",)
    assert ld.clauses and all(re.fullmatch(r"[PR]\d{1,2}", c) for c in ld.clauses)
    assert whole_cents(d.refund_total)


@st.composite
def settlements(draw: st.DrawFn) -> tuple[AuthorizedLine, ReceivedCounts, Resolution, bool]:
    qty = draw(st.integers(1, 12))
    basis = draw(st.sampled_from([Basis.FULL_REFUND, Basis.LATE_RETURN, Basis.DAMAGE, Basis.EXCHANGE]))
    price, tax = draw(cents), draw(cents)
    authorized = D("0.00")
    if basis is Basis.EXCHANGE:
        authorized = (draw(st.integers(0, int(price * 100))) * qty) / D(100)
        authorized = authorized.quantize(CENT)
    parts = sorted(draw(st.lists(st.integers(0, qty), min_size=3, max_size=3)))
    counts = ReceivedCounts(parts[0], parts[1] - parts[0], parts[2] - parts[1], qty - parts[2])
    resolution = {Basis.EXCHANGE: Resolution.EXCHANGE, Basis.DAMAGE: draw(st.sampled_from(
        [Resolution.REFUND, Resolution.REPLACEMENT]))}.get(basis, Resolution.REFUND)
    return AuthorizedLine("SKU-A", qty, basis, price, tax, authorized, "SKU-B"), counts, resolution, draw(st.booleans())


@PROPS
@given(settlements())
def test_property_settlement_never_pays_more_than_price_and_tax(
    case: tuple[AuthorizedLine, ReceivedCounts, Resolution, bool],
) -> None:
    ln, counts, resolution, approved = case
    s = settle_line(P, ln, counts, resolution, approved)
    price = (ln.unit_price * ln.quantity).quantize(CENT)
    tax = (ln.unit_tax * ln.quantity).quantize(CENT)
    assert whole_cents(s.refund) and whole_cents(s.restocking_fee)
    assert D("0.00") <= s.refund <= price + tax
    assert s.refunded_units <= counts.unopened + counts.opened + counts.damaged  # never a missing unit
    if ln.basis is not Basis.LATE_RETURN:
        assert s.restocking_fee == D("0.00")
    else:
        paid = (ln.unit_price * s.refunded_units).quantize(CENT)
        assert s.restocking_fee == (paid * D("0.20")).quantize(CENT, rounding=ROUND_HALF_UP)
    if s.review:
        assert s.refund == D("0.00")


@st.composite
def payment_sets(draw: st.DrawFn) -> tuple[list[PaymentFacts], Decimal]:
    n = draw(st.integers(1, 5))
    payments = []
    for i in range(n):
        captured = draw(st.integers(0, 50_000))
        refunded = draw(st.integers(0, captured))
        at = BASE + timedelta(seconds=draw(st.integers(0, 10)))  # ties on purpose
        payments.append(PaymentFacts(i + 1, "visa", None, D(captured) / 100, D(refunded) / 100, at))
    room = sum((p.captured - p.refunded for p in payments), D(0))
    amount = (D(draw(st.integers(0, int(room * 100) + 3))) / 100).quantize(CENT)
    return payments, amount


@PROPS
@given(payment_sets())
def test_property_allocation_sums_to_the_amount_within_each_payments_room(
    case: tuple[list[PaymentFacts], Decimal],
) -> None:
    payments, amount = case
    room = {p.payment_id: p.captured - p.refunded for p in payments}
    if amount > sum(room.values()):
        with pytest.raises(InvalidInput):
            allocate_refund(amount, payments)
        return
    allocs = allocate_refund(amount, payments)
    assert sum((a.amount for a in allocs), D(0)) == amount
    assert len({a.payment_id for a in allocs}) == len(allocs)
    for a in allocs:
        assert D(0) < a.amount <= room[a.payment_id]
    # most recent first: a payment is touched only once every more recent one is exhausted
    order_ = sorted(payments, key=lambda p: (p.captured_at, p.payment_id), reverse=True)
    got = {a.payment_id: a.amount for a in allocs}
    for i, p in enumerate(order_):
        if got.get(p.payment_id):
            assert all(got.get(q.payment_id, D(0)) == room[q.payment_id] for q in order_[:i])


# ---- RMA numbers ------------------------------------------------------------------------------------------------


def rma_from(body: str) -> str:
    return new_rma(bytes(ALPHABET.index(ch) for ch in body))


SAMPLE_RMAS = [rma_from(b) for b in ("7K2QMX", "000000", "YYYYYY", "10K0QM", "ABCDEF", "XY9123")] + [
    new_rma(bytes(range(i, i + 6))) for i in (0, 40, 200)]


def test_new_rma_parses_back_and_is_canonical() -> None:
    for rma in SAMPLE_RMAS + [new_rma() for _ in range(200)]:
        assert is_canonical(rma)
        assert parse_rma(rma) == rma
    assert rma_from("7K2QMX").startswith("RMA-7K2QMX")


@pytest.mark.parametrize("rma", SAMPLE_RMAS)
def test_every_single_symbol_substitution_is_refused(rma: str) -> None:
    symbols = rma[4:]
    for i, original in enumerate(symbols):
        for other in ALPHABET:
            if other == original:
                continue
            typo = f"RMA-{symbols[:i]}{other}{symbols[i + 1:]}"
            with pytest.raises(InvalidInput, match="check character"):
                parse_rma(typo)


def _adjacent_transpositions(rma: str) -> list[str]:
    s = rma[4:]
    return [f"RMA-{s[:i]}{s[i + 1]}{s[i]}{s[i + 2:]}" for i in range(len(s) - 1) if s[i] != s[i + 1]]


@pytest.mark.parametrize("rma", SAMPLE_RMAS)
def test_adjacent_transpositions_are_refused(rma: str) -> None:
    swaps = _adjacent_transpositions(rma)
    for typo in swaps:
        with pytest.raises(InvalidInput, match="check character"):
            parse_rma(typo)


def test_every_adjacent_transposition_of_every_symbol_pair_is_refused() -> None:
    slipped = []
    for a in ALPHABET:
        for b in ALPHABET:
            if a == b:
                continue
            for pos in range(5):
                body = ("7K2QMX"[:pos] + a + b + "7K2QMX"[pos + 2:])[:6]
                rma = rma_from(body)
                for typo in _adjacent_transpositions(rma):
                    try:
                        parse_rma(typo)
                    except InvalidInput:
                        continue
                    slipped.append((rma, typo))
    assert slipped == []


def test_rma_typed_loosely_normalizes() -> None:
    rma = rma_from("10K0QM")
    body = rma[4:]
    assert parse_rma(rma.lower()) == rma
    assert parse_rma(f"  rma {body.lower()} ") == rma
    assert parse_rma(body) == rma
    assert parse_rma("RMA-" + body.replace("0", "O")) == rma
    assert parse_rma("rma-" + body.replace("0", "o").replace("1", "l")) == rma
    assert parse_rma("RMA-" + body.replace("1", "I")) == rma
    assert parse_rma("RMA-" + body[:3] + "-" + body[3:]) == rma


@pytest.mark.parametrize("text", [
    "", "RMA-", "RMA-7K2QMX", "RMA-7K2QMXPP", "../../etc/passwd", "RMA-../../x", "RMA-7K2QMU?", "RMA-7K2Q\x00XP",
    "R" * 41, None, 1234567, b"RMA-7K2QMXP",
])
def test_malformed_rma_is_refused(text: object) -> None:
    with pytest.raises(InvalidInput, match="looks like"):
        parse_rma(text)


# ---- the lifecycle table -------------------------------------------------------------------------------------

S = State
# Transcribed from docs/architecture.md "Lifecycle states" (state | meaning | next).
DESIGN_TABLE: dict[State, frozenset[State]] = {
    S.REQUESTED: frozenset({S.AUTHORIZED, S.DECLINED, S.REVIEW}),
    S.REVIEW: frozenset({S.AUTHORIZED, S.DECLINED, S.PROCESSING}),
    S.DECLINED: frozenset(),
    S.AUTHORIZED: frozenset({S.RECEIVED, S.EXPIRED, S.CANCELLED}),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
    S.RECEIVED: frozenset({S.PROCESSING, S.REVIEW}),
    S.PROCESSING: frozenset({S.COMPLETED, S.REVIEW}),
    S.COMPLETED: frozenset(),
}


def test_transition_table_matches_the_architecture_doc() -> None:
    assert TRANSITIONS == DESIGN_TABLE
    assert set(State) == set(TRANSITIONS)


ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def test_transcribed_table_is_the_one_in_the_architecture_doc() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    parsed: dict[State, frozenset[State]] = {}
    for row in re.finditer(r"^\| `(\w+)` \|[^|]*\| ([^|]*) \|$", text, re.M):
        nxt = row.group(2).strip()
        parsed[State(row.group(1))] = frozenset() if nxt == "terminal" else frozenset(
            State(s) for s in re.findall(r"`(\w+)`", nxt))
    assert parsed == DESIGN_TABLE


def test_terminal_states_have_no_way_out() -> None:
    assert {S.DECLINED, S.EXPIRED, S.CANCELLED, S.COMPLETED} == TERMINAL
    for src in TERMINAL:
        for dst in State:
            with pytest.raises(InvalidTransition):
                check_transition(src, dst)


def test_check_transition_follows_the_table_exactly() -> None:
    for src in State:
        for dst in State:
            if dst in TRANSITIONS[src]:
                check_transition(src, dst)
            else:
                with pytest.raises(InvalidTransition):
                    check_transition(src, dst)


def _reachable(start: State, avoiding: State) -> set[State]:
    """States reachable from `start` without passing `avoiding`, following check_transition (whose receipt
    guard holds until the path has passed `received`)."""
    seen_pairs, todo = {(start, False)}, deque([(start, False)])
    while todo:
        src, received = todo.popleft()
        for nxt in TRANSITIONS[src]:
            try:
                check_transition(src, nxt, received=received)
            except InvalidTransition:
                continue
            pair = (nxt, received or nxt is S.RECEIVED)
            if nxt != avoiding and pair not in seen_pairs:
                seen_pairs.add(pair)
                todo.append(pair)
    return {state for state, _ in seen_pairs}


def test_received_is_reachable_only_through_authorized() -> None:
    assert S.RECEIVED in _reachable(S.REQUESTED, avoiding=S.REVIEW)  # the normal path exists
    assert S.RECEIVED not in _reachable(S.REQUESTED, avoiding=S.AUTHORIZED)


def test_processing_and_completed_are_reachable_only_after_authorized_and_received() -> None:
    for start in (S.REQUESTED, S.AUTHORIZED):
        assert S.PROCESSING not in _reachable(start, avoiding=S.RECEIVED) - {start}
        assert S.COMPLETED not in _reachable(start, avoiding=S.RECEIVED)
    assert S.PROCESSING not in _reachable(S.REQUESTED, avoiding=S.AUTHORIZED)
