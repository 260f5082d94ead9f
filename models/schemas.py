"""The JSON contract (README): strict input models; unknown keys, wrong types and naive times are refused."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from models.errors import InvalidInput
from models.policy import Reason, ReceivedCounts, Resolution

# Printable text only: no control characters (they end up in PDFs, emails and logs), C1 and Unicode line breaks
# included, nor the bidirectional overrides that make a name display as something else.
_PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]*$"
Key = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Text = Annotated[str, StringConstraints(max_length=200, pattern=_PRINTABLE)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=_PRINTABLE)]
# The one email validator (pydantic's, RFC 5322 addr-spec without display name); bounded before it runs.
Email = Annotated[EmailStr, StringConstraints(max_length=254)]
EMAIL = TypeAdapter(Email)
Money = Annotated[str, StringConstraints(max_length=16, pattern=r"^\d{1,7}(\.\d{1,2})?$")]
Quantity = Annotated[int, Field(gt=0, le=10_000)]
IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
Count = Annotated[int, Field(ge=0, le=10_000)]


class Strict(BaseModel):
    """Validate with `parse()`: strict JSON mode accepts ISO strings for dates but no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


M = TypeVar("M", bound=Strict)


class ProductIn(Strict):
    sku: Key
    name: Name
    kind: Literal["skincare", "tshirt", "trial_kit", "sample", "other"]
    size: Literal["retail", "travel", "professional"]
    final_sale: bool = False
    price: Money | None = None


class AddressIn(Strict):
    line1: Name
    line2: Text = ""
    city: Name
    region: Text = ""
    postal_code: Annotated[str, StringConstraints(min_length=1, max_length=20, pattern=_PRINTABLE)]
    country: Annotated[str, StringConstraints(min_length=2, max_length=2, pattern=r"^[A-Z]{2}$")]


class CustomerIn(Strict):
    account: Key
    name: Name
    email: Email
    address: AddressIn


class OrderLineIn(Strict):
    sku: Key
    quantity: Quantity
    unit_price: Money
    unit_tax: Money
    expires_on: date | None = None


class PaymentIn(Strict):
    method: Literal["amex", "visa", "mastercard", "discover", "paypal", "apple_pay", "afterpay"]
    amount: Money
    last4: Annotated[str, StringConstraints(pattern=r"^\d{4}$")] | None = None
    captured_at: AwareDatetime
    # Who captured the payment and its id there (Stripe payment intent or charge, PayPal capture, Afterpay
    # order); both absent means the ledger.
    provider: Literal["stripe", "paypal", "afterpay", "ledger"] | None = None
    reference: Annotated[str, StringConstraints(min_length=1, max_length=128,
                                                pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] | None = None

    @model_validator(mode="after")
    def _reference_with_its_provider(self) -> PaymentIn:
        """A provider refunds by its own reference: one without the other cannot be refunded."""
        if (self.provider not in (None, "ledger")) != (self.reference is not None):
            raise ValueError("a payment's provider (stripe, paypal, afterpay) and reference come together")
        return self


class OrderIn(Strict):
    number: Key
    account: Key
    channel: Literal["direct", "partner"]
    placed_at: AwareDatetime
    delivered_at: AwareDatetime | None = None
    lines: Annotated[list[OrderLineIn], Field(min_length=1, max_length=200)]
    payments: Annotated[list[PaymentIn], Field(max_length=20)] = []


class ImportIn(Strict):
    products: Annotated[list[ProductIn], Field(max_length=10_000)] = []
    customers: Annotated[list[CustomerIn], Field(max_length=10_000)] = []
    orders: Annotated[list[OrderIn], Field(max_length=10_000)] = []


class RequestLineIn(Strict):
    sku: Key
    quantity: Quantity
    unopened: bool = True
    exchange_sku: Key | None = None


class ReturnRequestIn(Strict):
    """What a storefront sends to ask for a return (also the request deployment's parameter schema)."""

    order_number: Key
    email: Email
    reason: Reason
    resolution: Resolution | None = None
    lines: Annotated[list[RequestLineIn], Field(min_length=1, max_length=50)]
    idempotency_key: IdempotencyKey | None = None


class ReceiptLineIn(Strict):
    """One SKU's exceptions at the dock; the rest of the SKU's units on the RMA arrived unopened. `unopened`, when
    given, must be exactly that rest: a cross-check for a dock that counted every unit."""

    sku: Key
    opened: Count = 0
    damaged: Count = 0
    missing: Count = 0
    unopened: Count | None = None


OperatorName = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9._ -]+$")]


class ReceiptIn(Strict):
    """What the dock at Lantana records for a parcel: with no lines, every unit on the RMA arrived unopened."""

    rma: Annotated[str, StringConstraints(min_length=1, max_length=40)]
    received_at: AwareDatetime
    lines: Annotated[list[ReceiptLineIn], Field(max_length=50)] = []
    by: OperatorName = "dock"

    def counts(self, on_rma: Mapping[str, int]) -> dict[str, ReceivedCounts]:
        """Each SKU's condition counts, given the units per SKU on the RMA; InvalidInput (naming the SKU) for a SKU
        not on the RMA, one listed twice, or counts that do not fit the units on the RMA."""
        given: dict[str, ReceiptLineIn] = {}
        for line in self.lines:
            if line.sku not in on_rma:
                raise InvalidInput(f"sku {line.sku} is not on {self.rma}")
            if line.sku in given:
                raise InvalidInput(f"sku {line.sku} is counted twice")
            given[line.sku] = line
        out: dict[str, ReceivedCounts] = {}
        for sku, units in on_rma.items():
            line = given.get(sku) or ReceiptLineIn(sku=sku)
            exceptions = line.opened + line.damaged + line.missing
            if line.unopened is not None and line.unopened + exceptions != units:
                raise InvalidInput(f"sku {sku}: {line.unopened + exceptions} units counted, {units} on the RMA")
            if exceptions > units:
                raise InvalidInput(f"sku {sku}: {exceptions} units opened, damaged or missing, {units} on the RMA")
            out[sku] = ReceivedCounts(units - exceptions, line.opened, line.damaged, line.missing)
        return out


class ParcelIn(Strict):
    """One parcel of a dock session: the RMA as scanned (checked per parcel, so one bad label refuses only its own
    parcel) and its exceptions."""

    rma: Annotated[str, StringConstraints(max_length=200)]
    lines: Annotated[list[ReceiptLineIn], Field(max_length=50)] = []


def explain(exc: ValidationError) -> str:
    """One line naming the first offending field, without echoing the (possibly huge or hostile) value."""
    err = exc.errors(include_url=False, include_input=False)[0]
    # A location can be a key the sender made up: show it bounded and without control characters.
    where = "".join(ch if ch.isprintable() else "?" for ch in ".".join(str(p) for p in err["loc"]))
    where = (where if len(where) <= 60 else where[:57] + "...") or "input"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "field required"
    elif err["type"] == "timezone_aware":
        msg = "time needs a UTC offset, e.g. 2026-11-26T10:00:00-05:00"
    elif err["type"] == "string_pattern_mismatch":
        msg = "has characters that are not allowed"
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    return f"{where}: {msg}{more}"


def parse(model: type[M], data: str | bytes | object) -> M:
    """Validate JSON text, or a JSON-shaped Python value, strictly; raises ValidationError."""
    if not isinstance(data, (str, bytes)):
        try:
            data = json.dumps(data)
        except (TypeError, ValueError, RecursionError) as exc:  # not JSON-shaped, or nested beyond reason
            raise InvalidInput(f"input is not a JSON value ({type(exc).__name__})") from None
    return model.model_validate_json(data, strict=True)
