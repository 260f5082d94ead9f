"""The Jinja2 environment for outbox emails: HTML + text twins, autoescaped, strict, with the money/date filters."""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import Environment, FileSystemLoader, StrictUndefined, Undefined, select_autoescape
from markupsafe import Markup

from models.errors import PermanentError
from models.money import format_usd
from models.policy import DEFAULT_POLICY

if TYPE_CHECKING:
    pass


TEMPLATES = Path(__file__).resolve().parent.parent.parent / "templates"
# Headers are not folded below SMTP's 998-octet limit: folding at 78 makes Python move a whole short subject to a
# continuation line, which some readers show with a leading space.

PAYMENT_METHOD_NAMES = {
    "amex": "American Express",
    "visa": "Visa",
    "mastercard": "Mastercard",
    "discover": "Discover",
    "paypal": "PayPal",
    "apple_pay": "Apple Pay",
    "afterpay": "Afterpay",
}


# ---- errors --------------------------------------------------------------------------------------------------


class RenderError(PermanentError):
    """The message cannot be built from its stored context (missing variable, bad value, unknown kind)."""




# ---- filters -------------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _known(value: object) -> None:
    """A filter given a missing variable raises the template's UndefinedError (names it), not a ValueError."""
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()


def _amount(value: object) -> Decimal:
    _known(value)
    if isinstance(value, Decimal):
        return value
    if isinstance(value, str):
        try:
            amount = Decimal(value)
        except InvalidOperation:
            raise ValueError(f"not a decimal amount: {value[:20]!r}") from None
        if amount.is_finite():
            return amount
    raise ValueError(f"money must be a decimal string, got {type(value).__name__}")


def money(value: object) -> str:
    """"48.6" -> "$48.60"; floats and nulls are refused, never guessed."""
    return format_usd(_amount(value))


def _as_date(value: object) -> date:
    _known(value)
    if isinstance(value, datetime):
        return DEFAULT_POLICY.local_date(value) if value.tzinfo else value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        if "T" in value or " " in value.strip():
            return _as_date(datetime.fromisoformat(value))
        return date.fromisoformat(value)
    raise ValueError(f"not a date: {type(value).__name__}")


def long_date(value: object) -> str:
    """"2026-11-26" -> "November 26, 2026" (datetimes: the shop's calendar day)."""
    day = _as_date(value)
    return f"{day:%B} {day.day}, {day.year}"


def long_datetime(value: object) -> str:
    """An aware ISO datetime in the shop's time zone: "November 26, 2026 at 3:05 PM ET"."""
    _known(value)
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise ValueError("expected an aware ISO datetime")
    local = moment.astimezone(DEFAULT_POLICY.tz)
    hour = local.hour % 12 or 12
    return f"{long_date(local.date())} at {hour}:{local.minute:02d} {'AM' if local.hour < 12 else 'PM'} ET"


def payment_method(value: object) -> str:
    _known(value)
    method = str(value)
    return PAYMENT_METHOD_NAMES.get(method, method.replace("_", " ").title())


def payment_line(payment: object) -> str:
    """{"method": "visa", "last4": "4242", "amount": "48.60"} -> "Visa ending 4242: $48.60"."""
    _known(payment)
    if not isinstance(payment, dict):
        raise ValueError("a payment must be an object")
    method, last4, amount = payment["method"], payment["last4"], payment["amount"]
    ending = f" ending {last4}" if last4 else ""
    return f"{payment_method(method)}{ending}: {money(amount)}"


CONDITIONS = ("unopened", "opened", "damaged", "missing")


def condition_counts(line: object) -> str:
    """A received line's unit counts: "1 unopened, 1 opened" (R12)."""
    _known(line)
    if not isinstance(line, dict):
        raise ValueError("a received line must be an object")
    counts = [(int(line[c]), c) for c in CONDITIONS]
    return ", ".join(f"{n} {c}" for n, c in counts if n) or "nothing recorded"


def policy_refs(clauses: object) -> str:
    """["P3", "R1"] -> "policy P3, R1" (an empty list gives "")."""
    _known(clauses)
    if isinstance(clauses, str) or not isinstance(clauses, list | tuple):
        raise ValueError("clauses must be a list of clause ids")
    ids = [str(c) for c in clauses]
    return f"policy {', '.join(ids)}" if ids else ""


def is_positive(value: object) -> bool:
    return _amount(value) > 0


def _finalize(value: object) -> object:
    """Every printed value: a null is a data bug (never print "None"); control characters become spaces."""
    if value is None:
        raise ValueError("a template printed a null value")
    if isinstance(value, str) and not isinstance(value, Markup):
        return _CONTROL.sub(" ", value)
    return value


def _build_environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(enabled_extensions=("html", "htm", "xml", "html.j2"), default=False),
        undefined=StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    environment.filters.update(
        money=money,
        date=long_date,
        datetime=long_datetime,
        payment_method=payment_method,
        payment=payment_line,
        conditions=condition_counts,
        policy=policy_refs,
    )
    environment.tests["positive"] = is_positive
    return environment


ENV = _build_environment()


