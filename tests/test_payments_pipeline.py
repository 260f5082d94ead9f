"""Payments through their providers in the pipeline: the import records who captured each payment, and existing
databases migrate with their payments on the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from pydantic import ValidationError
from sqlalchemy import select, text

from adapters.db import MIGRATIONS, engine_for, normalize_url, unit_of_work, upgrade
from models.schemas import ImportIn, parse
from models.tables import Payment
from service.steps import Pipeline

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
