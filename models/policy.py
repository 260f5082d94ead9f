"""The return policy (docs/policy.md P1-P10, R1-R15) as pure functions of stored facts and `now`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from zoneinfo import ZoneInfo

from models.errors import InvalidInput
from models.money import round_cents


class Reason(StrEnum):
    UNWANTED = "unwanted"
    DAMAGED = "damaged"
    SHIPPING_ERROR = "shipping_error"
    WRONG_PRODUCT = "wrong_product"


class Resolution(StrEnum):
    REFUND = "refund"
    REPLACEMENT = "replacement"
    EXCHANGE = "exchange"


class Outcome(StrEnum):
    AUTHORIZED = "authorized"
    DECLINED = "declined"
    REVIEW = "review"


class Basis(StrEnum):
    """Which clause a line is returned under; it fixes the money rules at receipt."""

    FULL_REFUND = "P3"
    LATE_RETURN = "P4"
    DAMAGE = "P5"
    EXCHANGE = "P6"
    NONE = "-"


NON_RETURNABLE_KINDS = frozenset({"tshirt", "trial_kit", "sample"})

DEFAULT_RESOLUTION = {
    Reason.UNWANTED: Resolution.REFUND,
    Reason.DAMAGED: Resolution.REPLACEMENT,
    Reason.SHIPPING_ERROR: Resolution.REPLACEMENT,
    Reason.WRONG_PRODUCT: Resolution.EXCHANGE,
}
ALLOWED_RESOLUTIONS = {
    Reason.UNWANTED: frozenset({Resolution.REFUND}),
    Reason.DAMAGED: frozenset({Resolution.REPLACEMENT, Resolution.REFUND}),
    Reason.SHIPPING_ERROR: frozenset({Resolution.REPLACEMENT, Resolution.REFUND}),
    Reason.WRONG_PRODUCT: frozenset({Resolution.EXCHANGE}),
}


@dataclass(frozen=True)
class Policy:
    """One versioned policy: every number of docs/policy.md is a field, so a shop changes data, not code."""

    version: str = "image-skincare-2026.1"
    timezone: str = "America/New_York"
    full_refund_days: int = 30  # P3, R1
    late_return_min_shelf_life_years: int = 1  # P4, R2
    restocking_fee_rate: Decimal = Decimal("0.20")  # P4, R4
    damage_report_hours: int = 48  # P5, R6
    wrong_product_days: int = 30  # P6
    rma_valid_days: int = 30  # R8
    processing_days: int = 10  # P8, R9
    escalate_before_hours: int = 48  # R9
    processing_lease_minutes: int = 15  # how long a claimed return may sit in `processing` before a sweep re-drives it
    non_returnable_kinds: frozenset[str] = NON_RETURNABLE_KINDS  # P2
    returnable_sizes: frozenset[str] = frozenset({"retail"})  # R5

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def local_date(self, moment: datetime) -> date:
        """The calendar date of an aware moment in the shop's time zone."""
        return moment.astimezone(self.tz).date()

    def rma_valid_until(self, issued_at: datetime) -> datetime:
        """R8: the RMA lapses this long after issue."""
        return issued_at + timedelta(days=self.rma_valid_days)

    def processing_deadline(self, received_at: datetime) -> datetime:
        """P8, R9: processed within `processing_days` of receipt."""
        return received_at + timedelta(days=self.processing_days)

    def due_soon_at(self, deadline: datetime) -> datetime:
        """R9: escalate this long before the deadline."""
        return deadline - timedelta(hours=self.escalate_before_hours)


DEFAULT_POLICY = Policy()


# ---- facts in --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderFacts:
    number: str
    channel: str
    placed_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True)
class LineFacts:
    """One order line as stored, with what is still returnable on it (R11)."""

    sku: str
    product_name: str
    kind: str
    size: str
    final_sale: bool
    quantity_shipped: int
    quantity_available: int
    unit_price: Decimal
    unit_tax: Decimal
    expires_on: date | None


@dataclass(frozen=True)
class RequestedLine:
    sku: str
    quantity: int
    unopened: bool
    exchange_sku: str | None = None


@dataclass(frozen=True)
class ReturnRequest:
    reason: Reason
    resolution: Resolution
    lines: tuple[RequestedLine, ...]


# ---- decisions out ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineDecision:
    sku: str
    quantity: int
    outcome: Outcome
    basis: Basis
    clauses: tuple[str, ...]
    reason: str
    refund: Decimal
    restocking_fee: Decimal
    exchange_sku: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "sku": self.sku,
            "quantity": self.quantity,
            "decision": str(self.outcome),
            "basis": str(self.basis),
            "clauses": list(self.clauses),
            "reason": self.reason,
            "refund": str(self.refund),
            "restocking_fee": str(self.restocking_fee),
            "exchange_sku": self.exchange_sku,
        }


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    policy_version: str
    reason: Reason
    resolution: Resolution
    lines: tuple[LineDecision, ...]
    clauses: tuple[str, ...]
    summary: str

    @property
    def authorized_lines(self) -> tuple[LineDecision, ...]:
        return tuple(ln for ln in self.lines if ln.outcome is Outcome.AUTHORIZED)

    @property
    def covered_lines(self) -> tuple[LineDecision, ...]:
        """The lines an RMA covers: authorized ones, plus those under review while the request is."""
        if self.outcome is Outcome.REVIEW:
            return tuple(ln for ln in self.lines if ln.outcome is not Outcome.DECLINED)
        return self.authorized_lines

    @property
    def refund_total(self) -> Decimal:
        """R14: the RMA covers the authorized lines (and, on review, the lines an operator may authorize)."""
        counted = self.covered_lines
        return sum((ln.refund for ln in counted), Decimal("0.00"))

    @property
    def prepaid_label(self) -> bool:
        """R6: the shop pays return postage on damage and shipping-error claims."""
        return self.reason in (Reason.DAMAGED, Reason.SHIPPING_ERROR)

    def as_dict(self) -> dict[str, object]:
        return {
            "decision": str(self.outcome),
            "policy_version": self.policy_version,
            "reason": str(self.reason),
            "resolution": str(self.resolution),
            "clauses": list(self.clauses),
            "summary": self.summary,
            "lines": [ln.as_dict() for ln in self.lines],
            "refund_total": str(self.refund_total),
            "prepaid_label": self.prepaid_label,
        }


# ---- the rules -------------------------------------------------------------------------------------------


def add_years(day: date, years: int) -> date:
    """Same month and day `years` later; Feb 29 becomes Feb 28 (R2)."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)


def restocking_fee(policy: Policy, price_paid: Decimal) -> Decimal:
    """R4: `restocking_fee_rate` of the price paid on the line (tax excluded), rounded half-up to the cent."""
    return round_cents(price_paid * policy.restocking_fee_rate)


def line_amounts(unit_price: Decimal, unit_tax: Decimal, quantity: int) -> tuple[Decimal, Decimal]:
    """Price paid and tax charged for `quantity` units (R3: the refund base)."""
    return round_cents(unit_price * quantity), round_cents(unit_tax * quantity)


def _line(
    req: RequestedLine,
    outcome: Outcome,
    basis: Basis,
    clauses: tuple[str, ...],
    reason: str,
    refund: Decimal = Decimal("0.00"),
    fee: Decimal = Decimal("0.00"),
) -> LineDecision:
    return LineDecision(
        sku=req.sku,
        quantity=req.quantity,
        outcome=outcome,
        basis=basis,
        clauses=clauses,
        reason=reason,
        refund=refund,
        restocking_fee=fee,
        exchange_sku=req.exchange_sku,
    )


def _decide_damage(
    policy: Policy, order: OrderFacts, req: RequestedLine, line: LineFacts, resolution: Resolution, now: datetime
) -> LineDecision:
    """P5 / R6 / R15: damage and shipping errors, reported within `damage_report_hours` of delivery."""
    price, tax = line_amounts(line.unit_price, line.unit_tax, req.quantity)
    refund = price + tax if resolution is Resolution.REFUND else Decimal("0.00")
    if order.delivered_at is None:
        return _line(
            req, Outcome.REVIEW, Basis.DAMAGE, ("P5", "R15"),
            f"The order has no recorded delivery time, so the {policy.damage_report_hours}-hour window cannot be "
            "checked; Customer Care will review the claim.",
            refund=refund,
        )
    if now - order.delivered_at > timedelta(hours=policy.damage_report_hours):
        return _line(
            req, Outcome.DECLINED, Basis.NONE, ("P5", "R6"),
            f"Damage and shipping errors must be reported within {policy.damage_report_hours} hours of "
            "delivery. A standard return (P3/P4) can still be requested for this item.",
        )
    if resolution is Resolution.REFUND:
        return _line(
            req, Outcome.AUTHORIZED, Basis.DAMAGE, ("P5", "R6"),
            f"Reported within {policy.damage_report_hours} hours of delivery: full refund of price and tax, "
            "no restocking fee, return postage paid by the shop.",
            refund=refund,
        )
    return _line(
        req, Outcome.AUTHORIZED, Basis.DAMAGE, ("P5", "R6"),
        f"Reported within {policy.damage_report_hours} hours of delivery: a replacement ships when the item is "
        "received; return postage paid by the shop.",
    )


def _decide_exchange(
    policy: Policy,
    order: OrderFacts,
    req: RequestedLine,
    line: LineFacts,
    exchange_price: Decimal | None,
    now: datetime,
) -> LineDecision:
    """P6 / R7: the wrong product, asked within `wrong_product_days` of the order, comes back unopened for the right."""
    days = (policy.local_date(now) - policy.local_date(order.placed_at)).days
    if days > policy.wrong_product_days:
        return _line(
            req, Outcome.DECLINED, Basis.NONE, ("P6",),
            f"Exchanges for a wrongly ordered product must be asked within {policy.wrong_product_days} days of "
            f"the order; this order is {days} days old. A standard return (P4) may still be possible.",
        )
    if not req.unopened:
        return _line(
            req, Outcome.DECLINED, Basis.NONE, ("P6", "R7"),
            "An exchange needs the wrong item back unopened.",
        )
    if exchange_price is not None and exchange_price > line.unit_price:
        return _line(
            req, Outcome.REVIEW, Basis.EXCHANGE, ("P6", "R7"),
            "The correct item costs more than the one ordered; Customer Care will arrange the price difference.",
        )
    difference = Decimal("0.00")
    if exchange_price is not None and exchange_price < line.unit_price:
        difference = round_cents((line.unit_price - exchange_price) * req.quantity)
    return _line(
        req, Outcome.AUTHORIZED, Basis.EXCHANGE, ("P6", "R7"),
        "Exchange: send the unopened item back and the correct one ships when it arrives"
        + (f"; the price difference of {difference} is refunded." if difference else "."),
        refund=difference,
    )


def _decide_standard(
    policy: Policy, order: OrderFacts, req: RequestedLine, line: LineFacts, now: datetime
) -> LineDecision:
    """P3 / P4 with R1, R2, R3, R4, R5."""
    if line.size not in policy.returnable_sizes:
        return _line(
            req, Outcome.DECLINED, Basis.NONE, ("P3", "R5"),
            f"Only retail sizes can be returned; this item is a {line.size} size.",
        )
    if not req.unopened:
        return _line(
            req, Outcome.DECLINED, Basis.NONE, ("P3",),
            "Only unopened, unused products can be returned.",
        )
    request_day = policy.local_date(now)
    days = (request_day - policy.local_date(order.placed_at)).days
    price, tax = line_amounts(line.unit_price, line.unit_tax, req.quantity)
    if days <= policy.full_refund_days:
        return _line(
            req, Outcome.AUTHORIZED, Basis.FULL_REFUND, ("P3", "R1", "R3"),
            f"Unopened retail item returned {days} days after purchase (within {policy.full_refund_days}): "
            "full refund of the price and tax paid.",
            refund=price + tax,
        )
    fee = restocking_fee(policy, price)
    if line.expires_on is None:
        # The amounts are what the line earns if an operator confirms the expiry (R2).
        return _line(
            req, Outcome.REVIEW, Basis.LATE_RETURN, ("P4", "R2"),
            f"Purchased {days} days ago and no expiration date is recorded for this lot; "
            "Customer Care will check it.",
            refund=price + tax - fee,
            fee=fee,
        )
    needed = add_years(request_day, policy.late_return_min_shelf_life_years)
    if line.expires_on < needed:
        return _line(
            req, Outcome.DECLINED, Basis.NONE, ("P4", "R2"),
            f"Purchased {days} days ago: a return after {policy.full_refund_days} days needs an expiration date "
            f"on or after {needed.isoformat()}; this lot expires {line.expires_on.isoformat()}.",
        )
    return _line(
        req, Outcome.AUTHORIZED, Basis.LATE_RETURN, ("P4", "R2", "R4"),
        f"Purchased {days} days ago with an expiration date of {line.expires_on.isoformat()}: refund of the price "
        f"and tax paid less a {policy.restocking_fee_rate:.0%} restocking fee.",
        refund=price + tax - fee,
        fee=fee,
    )


def decide_line(
    policy: Policy,
    order: OrderFacts,
    reason: Reason,
    resolution: Resolution,
    req: RequestedLine,
    line: LineFacts,
    exchange_price: Decimal | None,
    now: datetime,
) -> LineDecision:
    """One line's decision, citing the clauses it rests on."""
    if order.channel != "direct":
        return _line(
            req, Outcome.DECLINED, Basis.NONE, ("P1",),
            "This order was bought from an authorized partner: please return it to the spa, doctor's office "
            "or retailer where you bought it.",
        )
    if reason in (Reason.DAMAGED, Reason.SHIPPING_ERROR):
        # The shop's own error: P5 governs whatever the item is, so P2 does not bar a replacement.
        return _decide_damage(policy, order, req, line, resolution, now)
    if line.kind in policy.non_returnable_kinds or line.final_sale:
        what = "final sale" if line.final_sale else line.kind.replace("_", " ")
        return _line(
            req, Outcome.DECLINED, Basis.NONE, ("P2",),
            f"Items sold as {what} cannot be returned." if line.final_sale
            else f"A {what} cannot be returned.",
        )
    if reason is Reason.WRONG_PRODUCT:
        return _decide_exchange(policy, order, req, line, exchange_price, now)
    return _decide_standard(policy, order, req, line, now)


def overall(lines: tuple[LineDecision, ...]) -> Outcome:
    """R14: review if any line needs it; else authorized if any line is; else declined."""
    outcomes = {ln.outcome for ln in lines}
    if Outcome.REVIEW in outcomes:
        return Outcome.REVIEW
    if Outcome.AUTHORIZED in outcomes:
        return Outcome.AUTHORIZED
    return Outcome.DECLINED


def _summary(outcome: Outcome, lines: tuple[LineDecision, ...]) -> str:
    declined = [ln for ln in lines if ln.outcome is Outcome.DECLINED]
    if outcome is Outcome.REVIEW:
        return "Customer Care will review this request before an RMA is issued."
    if outcome is Outcome.AUTHORIZED:
        if declined:
            return "An RMA is issued for the authorized lines; the other lines are declined (see each line)."
        return "An RMA is issued for every line."
    return "This request is declined (see each line's reason)."


def validate_request(
    req: ReturnRequest, lines: dict[str, LineFacts], known_skus: frozenset[str]
) -> None:
    """Raise InvalidInput for a request that contradicts the order (R11) or names unknown products."""
    if not req.lines:
        raise InvalidInput("a request needs at least one line")
    if req.resolution not in ALLOWED_RESOLUTIONS[req.reason]:
        allowed = ", ".join(sorted(ALLOWED_RESOLUTIONS[req.reason]))
        raise InvalidInput(f"resolution '{req.resolution}' does not apply to reason '{req.reason}' (use {allowed})")
    seen: set[str] = set()
    for rl in req.lines:
        if rl.sku in seen:
            raise InvalidInput(f"sku {rl.sku} appears twice in the request; give one line with the total quantity")
        seen.add(rl.sku)
        if rl.sku not in known_skus:
            raise InvalidInput(f"unknown sku {rl.sku}")
        facts = lines.get(rl.sku)
        if facts is None:
            raise InvalidInput(f"sku {rl.sku} is not on this order")
        if rl.quantity > facts.quantity_available:
            raise InvalidInput(
                f"sku {rl.sku}: {rl.quantity} units asked, {facts.quantity_available} left to return on this "
                f"order line (R11)"
            )
        if req.reason is Reason.WRONG_PRODUCT:
            if not rl.exchange_sku:
                raise InvalidInput(f"sku {rl.sku}: a wrong_product request needs exchange_sku (the item wanted)")
            if rl.exchange_sku not in known_skus:
                raise InvalidInput(f"unknown exchange_sku {rl.exchange_sku}")
        elif rl.exchange_sku:
            raise InvalidInput("exchange_sku applies only to reason wrong_product")


def decide(
    policy: Policy,
    order: OrderFacts,
    lines: dict[str, LineFacts],
    request: ReturnRequest,
    now: datetime,
    exchange_prices: dict[str, Decimal | None] | None = None,
) -> Decision:
    """The whole request's decision from stored facts at `now` (an aware datetime)."""
    if now.tzinfo is None:
        raise InvalidInput("the decision time needs a UTC offset")
    prices = exchange_prices or {}
    decided = tuple(
        decide_line(
            policy, order, request.reason, request.resolution, rl, lines[rl.sku],
            prices.get(rl.exchange_sku) if rl.exchange_sku else None, now,
        )
        for rl in request.lines
    )
    outcome = overall(decided)
    clauses = tuple(sorted({c for ln in decided for c in ln.clauses} | {"R14"}, key=_clause_key))
    return Decision(
        outcome=outcome,
        policy_version=policy.version,
        reason=request.reason,
        resolution=request.resolution,
        lines=decided,
        clauses=clauses,
        summary=_summary(outcome, decided),
    )


def _clause_key(cid: str) -> tuple[str, int]:
    return cid[0], int(cid[1:])


# ---- receipt and settlement ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedCounts:
    unopened: int = 0
    opened: int = 0
    damaged: int = 0
    missing: int = 0

    @property
    def total(self) -> int:
        return self.unopened + self.opened + self.damaged + self.missing


@dataclass(frozen=True)
class AuthorizedLine:
    """A line on an RMA as stored: what was authorized and on which basis."""

    sku: str
    quantity: int
    basis: Basis
    unit_price: Decimal
    unit_tax: Decimal
    authorized_refund: Decimal
    exchange_sku: str | None = None


@dataclass(frozen=True)
class LineSettlement:
    sku: str
    refund: Decimal
    restocking_fee: Decimal
    refunded_units: int
    replacement_units: int
    review: bool
    clauses: tuple[str, ...]
    note: str

    def as_dict(self) -> dict[str, object]:
        return {
            "sku": self.sku,
            "refund": str(self.refund),
            "restocking_fee": str(self.restocking_fee),
            "refunded_units": self.refunded_units,
            "replacement_units": self.replacement_units,
            "review": self.review,
            "clauses": list(self.clauses),
            "note": self.note,
        }


@dataclass(frozen=True)
class Settlement:
    lines: tuple[LineSettlement, ...]
    review: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "review", any(ln.review for ln in self.lines))

    @property
    def refund_total(self) -> Decimal:
        return sum((ln.refund for ln in self.lines), Decimal("0.00"))


def settle_line(
    policy: Policy, line: AuthorizedLine, counts: ReceivedCounts, resolution: Resolution, approved: bool = False
) -> LineSettlement:
    """R12 / R6 / R7 / R15: what the received units earn, or whether an operator must look.

    `approved` is an operator's authorize after a receipt-time review: the units that sent it to review
    (damaged in transit back, an opened exchange item) are then settled as if they had arrived sound.
    """
    if counts.total != line.quantity:
        raise InvalidInput(
            f"sku {line.sku}: {counts.total} units counted at receipt, {line.quantity} on the RMA"
        )
    if line.basis in (Basis.FULL_REFUND, Basis.LATE_RETURN):
        if counts.damaged and approved:
            counts = ReceivedCounts(counts.unopened + counts.damaged, counts.opened, 0, counts.missing)
        if counts.damaged:
            return LineSettlement(
                line.sku, Decimal("0.00"), Decimal("0.00"), 0, 0, True, ("R12",),
                f"{counts.damaged} unit(s) arrived damaged in transit back; an operator decides.",
            )
        price, tax = line_amounts(line.unit_price, line.unit_tax, counts.unopened)
        fee = restocking_fee(policy, price) if line.basis is Basis.LATE_RETURN else Decimal("0.00")
        refused = counts.opened + counts.missing
        note = "Refund for unopened units."
        if refused:
            note = f"{counts.unopened} unopened unit(s) refunded; {counts.opened} opened and {counts.missing} " \
                   "missing unit(s) earn no refund (R12)."
        clauses = ("P3", "R3", "R12") if line.basis is Basis.FULL_REFUND else ("P4", "R4", "R12")
        return LineSettlement(line.sku, price + tax - fee, fee, counts.unopened, 0, False, clauses, note)
    if line.basis is Basis.DAMAGE:
        arrived = counts.unopened + counts.opened + counts.damaged
        if resolution is Resolution.REFUND:
            price, tax = line_amounts(line.unit_price, line.unit_tax, arrived)
            return LineSettlement(
                line.sku, price + tax, Decimal("0.00"), arrived, 0, False, ("P5", "R6", "R12"),
                "Refund in full for the damaged or wrongly shipped item.",
            )
        return LineSettlement(
            line.sku, Decimal("0.00"), Decimal("0.00"), 0, arrived, False, ("P5", "R6", "R15"),
            f"{arrived} replacement unit(s) shipped.",
        )
    if line.basis is Basis.EXCHANGE:
        if (counts.opened or counts.damaged) and approved:
            counts = ReceivedCounts(counts.unopened + counts.opened + counts.damaged, 0, 0, counts.missing)
        if counts.opened or counts.damaged:
            return LineSettlement(
                line.sku, Decimal("0.00"), Decimal("0.00"), 0, 0, True, ("P6", "R7"),
                "The item for exchange came back opened or damaged; an operator decides.",
            )
        per_unit = line.authorized_refund / line.quantity if line.quantity else Decimal("0")
        refund = round_cents(per_unit * counts.unopened)
        return LineSettlement(
            line.sku, refund, Decimal("0.00"), 0, counts.unopened, False, ("P6", "R7", "R15"),
            f"{counts.unopened} correct unit(s) of {line.exchange_sku} shipped.",
        )
    raise InvalidInput(f"sku {line.sku} is not on the RMA as an authorized line")


def settle(
    policy: Policy,
    lines: tuple[AuthorizedLine, ...],
    counts: dict[str, ReceivedCounts],
    resolution: Resolution,
    approved: bool = False,
) -> Settlement:
    """The whole return's settlement at receipt."""
    missing = {ln.sku for ln in lines} - set(counts)
    if missing:
        raise InvalidInput(f"receipt has no counts for sku(s) {', '.join(sorted(missing))}")
    extra = set(counts) - {ln.sku for ln in lines}
    if extra:
        raise InvalidInput(f"receipt counts sku(s) not on the RMA: {', '.join(sorted(extra))}")
    return Settlement(tuple(settle_line(policy, ln, counts[ln.sku], resolution, approved) for ln in lines))


# ---- refunds to payments (R10) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PaymentFacts:
    payment_id: int
    method: str
    last4: str | None
    captured: Decimal
    refunded: Decimal
    captured_at: datetime


@dataclass(frozen=True)
class Allocation:
    payment_id: int
    amount: Decimal


def allocate_refund(amount: Decimal, payments: list[PaymentFacts]) -> tuple[Allocation, ...]:
    """R10: most recent payment first, never more per payment than captured minus already refunded."""
    if amount < 0:
        raise InvalidInput("a refund cannot be negative")
    remaining = amount
    out: list[Allocation] = []
    for p in sorted(payments, key=lambda p: (p.captured_at, p.payment_id), reverse=True):
        if remaining <= 0:
            break
        room = p.captured - p.refunded
        take = min(room, remaining)
        if take > 0:
            out.append(Allocation(p.payment_id, take))
            remaining -= take
    if remaining > 0:
        raise InvalidInput(f"refund exceeds what is left to refund on the order's payments by {remaining}")
    return tuple(out)


# ---- deadlines (R8, R9) ----------------------------------------------------------------------------------


class Flag(StrEnum):
    ON_TIME = "on_time"
    DUE_SOON = "due_soon"
    OVERDUE = "overdue"


def deadline_flag(policy: Policy, deadline: datetime, as_of: datetime) -> Flag:
    """R9: due soon within `escalate_before_hours` of the deadline, overdue past it."""
    if as_of >= deadline:
        return Flag.OVERDUE
    if as_of >= policy.due_soon_at(deadline):
        return Flag.DUE_SOON
    return Flag.ON_TIME
