"""A small known history for the what-if and the report: five sample requests at NOW, two parcels processed (one
inside the 10 days, one after), one RMA left to expire. The numbers the tests expect are worked out below."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, parse
from service.steps import Pipeline
from tests import helpers
from tests.helpers import NOW, ROOT

ORDERS = ("IS-1001", "IS-1002", "IS-1003", "IS-1005", "IS-1008")
REQUESTS: dict[str, dict[str, Any]] = {
    s["request"]["order_number"]: s["request"]
    for s in json.loads((ROOT / "sample" / "requests.json").read_text(encoding="utf-8"))}
RECEIVED = NOW + timedelta(days=2)
PROCESSED = {"IS-1001": RECEIVED + timedelta(days=2), "IS-1002": RECEIVED + timedelta(days=12)}  # P8: 1 of 2
COUNTS = {"IS-1001": {"VC-SERUM-30": (1, 0, 0, 0)}, "IS-1002": {"PV-SPF50-91": (1, 1, 0, 0)}}
EXPIRY_SWEEP = NOW + timedelta(days=31)  # IS-1008's RMA lapses (R8)

# IS-1001: 1 x VC-SERUM-30 at 68.00 + 4.76 tax, P3 (15 days after purchase): refund 72.76, no fee.
# IS-1002: PV-SPF50-91 2 x 46.00 + 3.22 tax each, P4 (80 days): 98.44 - fee 18.40 = 80.04; OR-GEL-POL declined (R2).
#          At receipt one unit came back opened: settled 46.00 + 3.22 - 9.20 = 40.02, fee 9.20.
# IS-1008: 1 x VC-SERUM-30 at 68.00 + 4.76, P4 (49 days): 72.76 - 13.60 = 59.16; never shipped, expires.
PAID_REFUNDS, PAID_FEES = Decimal("112.78"), Decimal("9.20")


def build(p: Pipeline) -> dict[str, str]:
    """The history on `p`; the RMA of each authorized request by order number."""
    p.import_data(parse(ImportIn, (ROOT / "sample" / "catalog.json").read_text(encoding="utf-8")))
    rmas: dict[str, str] = {}
    for order in ORDERS:
        out = helpers.request(p, parse(ReturnRequestIn, REQUESTS[order]))
        if out.rma_number:
            rmas[order] = out.rma_number
    for order, lines in COUNTS.items():
        receipt = parse(ReceiptIn, {"rma": rmas[order], "received_at": RECEIVED.isoformat(), "by": "dock",
                                    "lines": [{"sku": sku, "unopened": c[0], "opened": c[1], "damaged": c[2],
                                               "missing": c[3]} for sku, c in lines.items()]})
        helpers.receive(p, receipt, now=RECEIVED)
    for order, at in PROCESSED.items():
        assert helpers.process(p, rmas[order], now=at) is not None
    helpers.sweep(p, EXPIRY_SWEEP)
    return rmas
