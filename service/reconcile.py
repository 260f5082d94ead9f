"""Refund reconciliation: the refunds we recorded against the ones each provider reports for the same payments.

It reads our database and asks the providers; it writes nothing. PayPal lists no refunds per capture, so there
each recorded refund is asked about by its id, and a refund made at PayPal without us cannot be seen from here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import Engine, select
from sqlmodel import col

from adapters.db import unit_of_work
from adapters.payments.base import ProviderPayment, ProviderRefused, RefundResult
from adapters.payments.providers import LEDGER, Providers
from models.tables import Payment, ProviderRefund


@dataclass(frozen=True)
class Difference:
    """One refund on which our record and the provider's disagree (ids and amounts only, no personal data)."""

    provider: str
    payment_id: int
    provider_ref: str
    difference: str  # missing at provider | missing in our records | amount differs | status differs
    ours: str
    theirs: str

    def row(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def reconcile(engine: Engine, providers: Providers, since: datetime, until: datetime) -> list[Difference]:
    """Differences for every payment with a provider refund recorded in [since, until)."""
    with unit_of_work(engine) as session:
        touched = set(session.scalars(select(col(ProviderRefund.payment_id)).where(
            col(ProviderRefund.created_at) >= since, col(ProviderRefund.created_at) < until)))
        payments = [ProviderPayment(p.id or 0, p.provider, p.reference or "") for p in session.scalars(
            select(Payment).where(col(Payment.id).in_(touched), col(Payment.provider) != LEDGER)
            .order_by(col(Payment.id)))]
        recorded: dict[int, dict[str, tuple[int, str]]] = defaultdict(dict)
        for r in session.scalars(select(ProviderRefund).where(col(ProviderRefund.payment_id).in_(touched),
                                                              col(ProviderRefund.provider_ref).is_not(None))):
            recorded[r.payment_id][str(r.provider_ref)] = (r.amount_cents, r.status)
    out: list[Difference] = []
    for payment in payments:
        ours = recorded[payment.payment_id]
        theirs = _theirs(providers, payment, list(ours))
        for ref, (cents, status) in sorted(ours.items()):
            found = theirs.get(ref)
            if found is None:
                out.append(Difference(payment.provider, payment.payment_id, ref, "missing at provider",
                                      f"{cents} {status}", "-"))
            elif found.amount_minor != cents:
                out.append(Difference(payment.provider, payment.payment_id, ref, "amount differs", str(cents),
                                      str(found.amount_minor)))
            elif str(found.status) != status:
                out.append(Difference(payment.provider, payment.payment_id, ref, "status differs", status,
                                      str(found.status)))
        for ref, found in sorted(theirs.items()):
            if ref not in ours:
                out.append(Difference(payment.provider, payment.payment_id, ref, "missing in our records", "-",
                                      f"{found.amount_minor} {found.status}"))
    return out


def _theirs(providers: Providers, payment: ProviderPayment, refs: list[str]) -> dict[str, RefundResult]:
    adapter = providers.adapter(payment.provider)
    lister = getattr(adapter, "refunds_of", None)  # Stripe and Afterpay list a payment's refunds; PayPal does not
    if lister is not None:
        return {res.provider_ref: res for _, res in lister(payment)}
    found: dict[str, RefundResult] = {}
    for ref in refs:
        try:
            found[ref] = adapter.get_refund(ref)
        except ProviderRefused:  # not found there: reported as missing at the provider
            continue
    return found
