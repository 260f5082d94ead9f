"""Money: exact Decimal dollars in the policy, integer cents in the database; never float."""

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

CENT = Decimal("0.01")
MAX_AMOUNT = Decimal("1000000.00")


def round_cents(amount: Decimal) -> Decimal:
    """Round half-up to the cent (docs/policy.md: money rounds half-up)."""
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def to_cents(amount: Decimal) -> int:
    """Exact cents of an amount that is already whole cents."""
    cents = amount * 100
    if cents != cents.to_integral_value():
        raise ValueError(f"{amount} is not a whole number of cents")
    return int(cents)


def from_cents(cents: int) -> Decimal:
    """Dollars as a two-place Decimal."""
    return (Decimal(cents) / 100).quantize(CENT)


def parse_amount(text: object, field: str) -> Decimal:
    """A non-negative money amount from a decimal string with at most two places; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"{field} must be a decimal string such as \"12.50\"")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{field} is not a decimal amount: {text[:40]!r}") from None
    if not value.is_finite() or value < 0 or value > MAX_AMOUNT:
        raise ValueError(f"{field} must be between 0 and {MAX_AMOUNT}")
    if value != value.quantize(CENT):
        raise ValueError(f"{field} has more than two decimal places")
    return value.quantize(CENT)


def format_usd(amount: Decimal) -> str:
    """US dollars for people: $1,234.50."""
    return f"${amount:,.2f}"
