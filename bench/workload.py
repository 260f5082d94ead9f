"""The benchmark's synthetic shop: N customers and N orders, each a P3 full refund today."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

SKUS = ("BN-SERUM-A", "BN-SERUM-B", "BN-CREAM-C", "BN-MASK-D", "BN-CLEANSE-E")


def synthetic_catalog(n: int, now: datetime) -> dict[str, Any]:
    """The import JSON (models.schemas.ImportIn) for N orders bought 5 days ago, delivered 2 days ago."""
    placed, delivered = (now - timedelta(days=5)).isoformat(), (now - timedelta(days=2)).isoformat()
    expires = (now.date() + timedelta(days=730)).isoformat()
    products = [{"sku": sku, "name": f"Bench {sku.split('-')[1].title()} {i + 1} 1 fl oz", "kind": "skincare",
                 "size": "retail", "final_sale": False, "price": "68.00"} for i, sku in enumerate(SKUS)]
    customers, orders = [], []
    for i in range(n):
        account = f"BA-{i:06d}"
        customers.append({"account": account, "name": f"Bench Customer {i}", "email": f"customer{i}@example.com",
                          "address": {"line1": f"{100 + i} Hypoluxo Rd", "line2": "", "city": "Lantana",
                                      "region": "FL", "postal_code": "33462", "country": "US"}})
        orders.append({"number": order_number(i), "account": account, "channel": "direct", "placed_at": placed,
                       "delivered_at": delivered,
                       "lines": [{"sku": SKUS[i % len(SKUS)], "quantity": 2, "unit_price": "68.00",
                                  "unit_tax": "4.76", "expires_on": expires}],
                       "payments": [{"method": "visa", "amount": "145.52", "last4": "4242", "captured_at": placed}]})
    return {"products": products, "customers": customers, "orders": orders}


def order_number(i: int) -> str:
    return f"BN-{i:06d}"


def request_params(i: int, run_tag: str) -> dict[str, Any]:
    """The storefront's request for order i (also the request deployment's parameters)."""
    return {"order_number": order_number(i), "email": f"customer{i}@example.com", "reason": "unwanted",
            "lines": [{"sku": SKUS[i % len(SKUS)], "quantity": 1, "unopened": True}],
            "idempotency_key": f"bench-{run_tag}-{i}"}


def receipt_params(i: int, rma: str, received_at: datetime) -> dict[str, Any]:
    """What the dock records for order i's parcel: the one unit, unopened."""
    return {"rma": rma, "received_at": received_at.isoformat(), "by": "lantana-dock",
            "lines": [{"sku": SKUS[i % len(SKUS)], "unopened": 1, "opened": 0, "damaged": 0, "missing": 0}]}
