"""A candidate policy replayed over stored requests: pure comparisons of stored decisions with new ones."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields, replace
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from models import policy as pol
from models.errors import InvalidInput
from models.policy import Outcome, Policy
from models.schemas import Strict

Days = Annotated[int, Field(ge=1, le=3650)]
Rate = Annotated[str, StringConstraints(max_length=8, pattern=r"^(0(\.\d{1,4})?|1(\.0{1,4})?)$")]


class PolicyChangesIn(Strict):
    """The numbers of the policy a what-if may change; each field is named as on `Policy`, unknown ones refused."""

    full_refund_days: Days | None = Field(default=None, description="P3, R1: full refund within this many days")
    late_return_min_shelf_life_years: Annotated[int, Field(ge=0, le=10)] | None = Field(
        default=None, description="P4, R2: a late return needs this many years before expiry")
    restocking_fee_rate: Rate | None = Field(default=None, description='P4, R4: the fee as a fraction, e.g. "0.15"')
    damage_report_hours: Annotated[int, Field(ge=1, le=8760)] | None = Field(
        default=None, description="P5, R6: damage reported within this many hours of delivery")
    wrong_product_days: Days | None = Field(default=None, description="P6: exchanges asked within this many days")
    rma_valid_days: Days | None = Field(default=None, description="R8: an RMA lapses this many days after issue")
    processing_days: Days | None = Field(default=None, description="P8, R9: processed within this many days")


CHANGEABLE = frozenset(PolicyChangesIn.model_fields)
NOT_REPLAYED = frozenset(f.name for f in fields(Policy)) - CHANGEABLE


def refuse_unreplayed(data: object) -> None:
    """A policy field no replay can check (its name, time zone, sizes, sweep timings) gets its own one-line refusal."""
    if isinstance(data, dict):
        named = sorted(NOT_REPLAYED & set(data))
        if named:
            changeable = ", ".join(sorted(CHANGEABLE))
            raise InvalidInput(f"{named[0]}: not a number a what-if replays (it changes: {changeable})")


def candidate(base: Policy, changes: PolicyChangesIn) -> Policy:
    """The base policy with the given numbers changed; its version says it is a what-if."""
    given: dict[str, Any] = changes.model_dump(exclude_none=True)
    if "restocking_fee_rate" in given:
        given["restocking_fee_rate"] = Decimal(given["restocking_fee_rate"])
    return replace(base, version=f"{base.version}+what-if", **given)


def changed_numbers(base: Policy, cand: Policy) -> dict[str, dict[str, str]]:
    """Each changed number as {field: {from, to}}."""
    return {name: {"from": str(getattr(base, name)), "to": str(getattr(cand, name))}
            for name in sorted(CHANGEABLE) if getattr(base, name) != getattr(cand, name)}


# ---- the period -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """Calendar days in the shop's time zone, both ends included; an open end reaches the start or end of history."""

    since: date | None = None
    until: date | None = None

    def __post_init__(self) -> None:
        if self.since and self.until and self.since > self.until:
            raise InvalidInput(f"the period starts ({self.since}) after it ends ({self.until})")

    def bounds(self, policy: Policy) -> tuple[datetime | None, datetime | None]:
        """[start, end) as aware moments: midnight of `since` to midnight after `until`, local time."""
        start = datetime.combine(self.since, time(), policy.tz) if self.since else None
        end = datetime.combine(self.until + timedelta(days=1), time(), policy.tz) if self.until else None
        return start, end

    def to_json(self) -> dict[str, str | None]:
        return {"since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None}


def parse_day(text: str | None, name: str) -> date | None:
    """A YYYY-MM-DD date, or InvalidInput naming the option."""
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{name} is not a date (YYYY-MM-DD): {text[:40]!r}") from None


# ---- one stored request, replayed --------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRequest:
    """A request as stored: what was asked, the facts it was decided on, its stored decision and its dates."""

    rma: str | None
    order_number: str
    requested_at: datetime
    request: pol.ReturnRequest
    order: pol.OrderFacts
    lines: dict[str, pol.LineFacts]
    exchange_prices: dict[str, Decimal | None]
    decision: dict[str, Any]  # Return.decision: what the request was told, never rewritten by later stages
    rma_issued_at: datetime | None
    rma_expires_at: datetime | None
    received_at: datetime | None
    deadline_at: datetime | None
    completed_at: datetime | None
    awaiting_parcel: bool  # authorized or expired without a receipt: R8 decides whether it lapsed
    expired: bool  # the sweep expired its RMA (R8)


@dataclass(frozen=True)
class Money:
    refund: Decimal
    fee: Decimal


@dataclass(frozen=True)
class ReturnChange:
    """How one stored request's outcome differs under the candidate policy."""

    rma: str | None
    order_number: str
    requested_on: date
    before: str
    after: str
    changes: tuple[str, ...]
    money_before: Money
    money_after: Money

    def to_json(self) -> dict[str, Any]:
        return {"rma": self.rma, "order_number": self.order_number, "requested_on": self.requested_on.isoformat(),
                "before": self.before, "after": self.after, "changes": list(self.changes),
                "refund_before": str(self.money_before.refund), "refund_after": str(self.money_after.refund),
                "fee_before": str(self.money_before.fee), "fee_after": str(self.money_after.fee)}

    def row(self) -> dict[str, str]:
        """A table row: ids and amounts only."""
        return {"rma": self.rma or "-", "order": self.order_number, "requested": self.requested_on.isoformat(),
                "decision": f"{self.before} -> {self.after}" if self.before != self.after else self.after,
                "refund": f"{self.money_before.refund} -> {self.money_after.refund}",
                "fee": f"{self.money_before.fee} -> {self.money_after.fee}",
                "changes": "; ".join(self.changes)}  # last: the long column


def _label(outcome: str, basis: str, clauses: list[str] | tuple[str, ...]) -> str:
    """`authorized P4`: the outcome and the clause it rests on (the basis, or a declined line's first clause)."""
    clause = basis if basis != pol.Basis.NONE else (clauses[0] if clauses else "-")
    return f"{outcome} {clause}"


def _stored_money(decision: dict[str, Any]) -> Money:
    lines = decision.get("lines", [])
    return Money(sum((Decimal(str(ln["refund"])) for ln in lines), Decimal("0.00")),
                 sum((Decimal(str(ln["restocking_fee"])) for ln in lines), Decimal("0.00")))


def _lapsed(expires_at: datetime, stored: StoredRequest, as_of: datetime) -> bool:
    """R8: the RMA lapsed before the parcel came; with none yet, by `as_of`; an expired one by its stored expiry too
    (the sweep found it lapsed, whenever that was)."""
    if stored.received_at is not None:
        return expires_at <= stored.received_at
    if stored.expired and stored.rma_expires_at is not None:
        as_of = max(as_of, stored.rma_expires_at)
    return expires_at <= as_of


def replay(cand: Policy, stored: StoredRequest, as_of: datetime) -> ReturnChange | None:
    """The request re-decided at its own date on its stored facts; None when nothing changes."""
    new = pol.decide(cand, stored.order, stored.lines, stored.request, stored.requested_at, stored.exchange_prices)
    old_lines = {str(ln["sku"]): ln for ln in stored.decision.get("lines", [])}
    changes: list[str] = []
    before, after = str(stored.decision["decision"]), str(new.outcome)
    if before != after:
        changes.append(f"decision {before} -> {after}")
    for ln in new.lines:
        old = old_lines[ln.sku]
        was = _label(str(old["decision"]), str(old["basis"]), old["clauses"])
        now = _label(str(ln.outcome), str(ln.basis), ln.clauses)
        if was != now:
            changes.append(f"{ln.sku}: {was} -> {now}")
        elif (Decimal(str(old["refund"])), Decimal(str(old["restocking_fee"]))) != (ln.refund, ln.restocking_fee):
            changes.append(f"{ln.sku}: {was} amounts")
    money_before = _stored_money(stored.decision)
    money_after = Money(sum((ln.refund for ln in new.lines), Decimal("0.00")),
                        sum((ln.restocking_fee for ln in new.lines), Decimal("0.00")))
    if stored.rma_issued_at and stored.rma_expires_at and (stored.received_at or stored.awaiting_parcel):
        # A lapsed RMA pays nothing (R8), under either policy; a request the candidate declines has no RMA to lapse.
        zero = Money(Decimal("0.00"), Decimal("0.00"))
        was_lapsed = _lapsed(stored.rma_expires_at, stored, as_of)
        money_before = zero if was_lapsed else money_before
        if new.outcome is not Outcome.DECLINED:
            is_lapsed = _lapsed(cand.rma_valid_until(stored.rma_issued_at), stored, as_of)
            if was_lapsed != is_lapsed:
                changes.append("R8: RMA " + ("lapsed -> valid" if was_lapsed else "valid -> lapsed"))
            money_after = zero if is_lapsed else money_after
    if stored.received_at and stored.deadline_at:
        processed = stored.completed_at or as_of
        was_late = processed > stored.deadline_at
        is_late = processed > cand.processing_deadline(stored.received_at)
        if was_late != is_late:
            changes.append("P8: processed " + ("late -> on time" if was_late else "on time -> late"))
    if not changes:
        return None
    return ReturnChange(stored.rma, stored.order_number, cand.local_date(stored.requested_at), before, after,
                        tuple(changes), money_before, money_after)


# ---- the whole replay -------------------------------------------------------------------------------------


def _kind(change: str) -> str:
    """`PV-SPF50-91: authorized P4 -> authorized P3` counts as `authorized P4 -> authorized P3`."""
    return change.split(": ", 1)[1] if ": " in change and not change.startswith(("R8", "P8")) else change


@dataclass(frozen=True)
class WhatIf:
    """The replay's answer: how many decisions change, how (per clause), the money that moves, and which returns."""

    policy: dict[str, dict[str, str]]
    period: Period
    replayed: int
    returns: tuple[ReturnChange, ...]

    @property
    def by_change(self) -> dict[str, int]:
        counts = Counter(_kind(c) for r in self.returns for c in r.changes)
        return dict(sorted(counts.items()))

    def money(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for name, attr in (("refunds", "refund"), ("restocking_fees", "fee")):
            before = sum((getattr(r.money_before, attr) for r in self.returns), Decimal("0.00"))
            after = sum((getattr(r.money_after, attr) for r in self.returns), Decimal("0.00"))
            out[name] = {"before": str(before), "after": str(after), "moves": str(after - before)}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "period": self.period.to_json(), "replayed": self.replayed,
                "changed": len(self.returns), "by_change": self.by_change, "money": self.money(),
                "returns": [r.to_json() for r in self.returns]}


def replay_all(base: Policy, cand: Policy, period: Period, stored: list[StoredRequest], as_of: datetime) -> WhatIf:
    """Every stored request of the period replayed under `cand`."""
    found = tuple(ch for s in stored if (ch := replay(cand, s, as_of)) is not None)
    return WhatIf(changed_numbers(base, cand), period, len(stored), found)
