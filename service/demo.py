"""The main job on embedded defaults: the sample returns driven through their whole life on a replayed clock."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, parse

SAMPLE = Path(__file__).resolve().parent.parent / "sample"

# The replayed clock: the sample orders were placed in Aug-Nov 2026 and the requests arrive on T_REQUEST.
T_REQUEST = datetime.fromisoformat("2026-11-20T10:00:00-05:00")
T_REVIEW = datetime.fromisoformat("2026-11-21T09:00:00-05:00")
T_RECEIPT = datetime.fromisoformat("2026-11-24T11:00:00-05:00")
T_SWEEP_DUE = datetime.fromisoformat("2026-12-03T09:00:00-05:00")
T_SWEEP_LATE = datetime.fromisoformat("2026-12-21T09:00:00-05:00")
T_LATE_REVIEW = datetime.fromisoformat("2026-12-21T10:00:00-05:00")

# What the dock counts per order when the parcels arrive (per sku: unopened, opened, damaged, missing).
RECEIPTS: dict[str, dict[str, tuple[int, int, int, int]]] = {
    "IS-1001": {"VC-SERUM-30": (1, 0, 0, 0)},
    "IS-1002": {"PV-SPF50-91": (1, 1, 0, 0)},
    "IS-1004": {"IL-FIRM-MASK": (0, 0, 1, 0)},
    "IS-1006": {"AG-RET-SRM": (1, 0, 0, 0)},
    "IS-1007": {"PV-SPF32-91": (1, 0, 0, 0)},
    "IS-1011": {"AG-RET-SRM": (0, 0, 1, 0), "IL-FIRM-MASK": (1, 0, 0, 0)},
}
REVIEW_BEFORE_RECEIPT = "IS-1006"  # no expiry recorded (R2): the operator checks the lot and authorizes
REVIEW_AFTER_RECEIPT = "IS-1011"  # damaged in transit back (R12): settled only after the sweeps have escalated it


class Driver(Protocol):
    """How the demo reaches the pipeline: in-process steps, or Prefect deployments over the API."""

    def import_data(self, data: ImportIn) -> dict[str, Any]: ...
    def request(self, req: ReturnRequestIn, now: datetime) -> dict[str, Any]: ...
    def review(self, rma: str, note: str, now: datetime) -> dict[str, Any]: ...
    def receive(self, receipt: ReceiptIn, now: datetime) -> dict[str, Any]: ...
    def sweep(self, as_of: datetime) -> dict[str, Any]: ...
    def show(self, rma: str, now: datetime) -> dict[str, Any]: ...
    def relay(self, now: datetime) -> dict[str, Any]: ...


@dataclass
class InProcess:
    """Drives the steps directly (no Prefect): the floor the orchestrated pipeline is measured against."""

    pipeline: Any

    def import_data(self, data: ImportIn) -> dict[str, Any]:
        return self.pipeline.import_data(data)

    def request(self, req: ReturnRequestIn, now: datetime) -> dict[str, Any]:
        from service.returns import Actor

        out = self.pipeline.request(req, now, Actor("api"))
        if out["state"] == "authorized":
            self.pipeline.render_label(out["rma_number"])
        return out

    def review(self, rma: str, note: str, now: datetime) -> dict[str, Any]:
        from service.returns import Actor

        out = self.pipeline.review(rma, True, note, "demo-operator", now)
        if out["state"] == "authorized":
            self.pipeline.render_label(rma)
        elif out["state"] == "processing":
            out = self.pipeline.finish(rma, now, Actor("operator:demo-operator"))
        return out

    def receive(self, receipt: ReceiptIn, now: datetime) -> dict[str, Any]:
        from service.returns import Actor

        out = self.pipeline.receive(receipt, now)
        if out["state"] == "received":
            out = self.pipeline.process(receipt.rma, now, Actor("api")) or out
        return out

    def sweep(self, as_of: datetime) -> dict[str, Any]:
        return self.pipeline.sweep(as_of) | {"board": self.pipeline.board(as_of)}

    def show(self, rma: str, now: datetime) -> dict[str, Any]:
        return self.pipeline.show(rma, now)

    def relay(self, now: datetime) -> dict[str, Any]:
        return self.pipeline.relay(now)


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_sample(driver: Driver) -> dict[str, dict[str, Any]]:
    """Drive every sample return through its life; return the final `show` of each, keyed by order number."""
    samples = json.loads((SAMPLE / "requests.json").read_text(encoding="utf-8"))
    counts = driver.import_data(parse(ImportIn, (SAMPLE / "catalog.json").read_text(encoding="utf-8")))
    _say(f"imported {counts}")
    _say(f"\n== {T_REQUEST.isoformat()}  requests arrive (P1-P6, R1-R15)")
    by_order: dict[str, str] = {}
    for sample in samples:
        req = parse(ReturnRequestIn, sample["request"] | {"idempotency_key": f"demo-{sample['request']['order_number']}"})
        out = driver.request(req, T_REQUEST)
        clauses = ",".join(out.get("clauses", []))
        _say(f"  {req.order_number:8} {out['decision']:10} {out.get('rma_number') or '-':12} "
             f"refund {out['refund_total']:>7}  [{clauses}]  {sample['label']}")
        if out.get("rma_number"):
            by_order[req.order_number] = out["rma_number"]
    _report_mail(driver.relay(T_REQUEST))

    _say(f"\n== {T_REVIEW.isoformat()}  operator settles the review of {REVIEW_BEFORE_RECEIPT} (R2)")
    out = driver.review(by_order[REVIEW_BEFORE_RECEIPT], "lot expiry checked: 2028-02, more than a year out", T_REVIEW)
    _say(f"  {REVIEW_BEFORE_RECEIPT:8} -> {out['state']}")
    _report_mail(driver.relay(T_REVIEW))

    _say(f"\n== {T_RECEIPT.isoformat()}  parcels received at Lantana (P7, P8, R12); processing starts")
    for order, lines in RECEIPTS.items():
        receipt = ReceiptIn(rma=by_order[order], received_at=T_RECEIPT, by="lantana-dock",
                            lines=[{"sku": sku, "unopened": c[0], "opened": c[1], "damaged": c[2], "missing": c[3]}
                                   for sku, c in lines.items()])  # type: ignore[misc]
        out = driver.receive(receipt, T_RECEIPT)
        _say(f"  {order:8} {by_order[order]:12} -> {out['state']}"
             + (f"  refunded {out['refund_total']}" if "refund_total" in out else ""))
    _report_mail(driver.relay(T_RECEIPT))

    for as_of in (T_SWEEP_DUE, T_SWEEP_LATE):
        _say(f"\n== {as_of.isoformat()}  deadline sweep (R8, R9)")
        out = driver.sweep(as_of)
        _say(f"  expired {out['expired']}  due soon {out['due_soon']}  overdue {out['overdue']}  "
             f"re-driven {out['processed']}")
        _say(f"  board: {out['board']['counts']}")
        _report_mail(driver.relay(as_of))

    _say(f"\n== {T_LATE_REVIEW.isoformat()}  operator settles {REVIEW_AFTER_RECEIPT} (damaged in transit back, R12)")
    out = driver.review(by_order[REVIEW_AFTER_RECEIPT], "carrier damage; refund in full, claim filed", T_LATE_REVIEW)
    _say(f"  {REVIEW_AFTER_RECEIPT:8} -> {out['state']}")
    _report_mail(driver.relay(T_LATE_REVIEW))

    return {order: driver.show(rma, T_LATE_REVIEW) for order, rma in by_order.items()}


def _report_mail(report: dict[str, Any]) -> None:
    sent, failed = len(report.get("sent", [])), len(report.get("failed", []))
    _say(f"  emails: {sent} sent" + (f", {failed} FAILED" if failed else ""))


def summarize(final: dict[str, dict[str, Any]], home: Path) -> None:
    """The closing table: every return's state and money, and where the documents are."""
    _say("\n== where every return ended")
    for order, shown in final.items():
        paid = ", ".join(f"{p['method']} {p['last4'] or ''} {p['amount']}".replace("  ", " ")
                         for p in shown["payments_refunded"])
        _say(f"  {order:8} {shown['rma_number']:12} {shown['state']:10} refund {shown['refund_total']:>7}"
             + (f"  to {paid}" if paid else ""))
    labels = sorted((home / "labels").glob("*.pdf"))
    mails = sorted((home / "mail").glob("*.eml"))
    _say(f"\n  {len(labels)} label PDFs in {home / 'labels'}")
    _say(f"  {len(mails)} emails in {home / 'mail'}")


def run_demo(exit_when_done: bool = True) -> int:
    """`returns demo`: a fresh sandbox under RETURNS_HOME/demo, the sample driven through, a summary."""
    from service.config import load_settings
    from service.db import engine_for, upgrade
    from service.steps import Pipeline

    base = load_settings()
    home = base.home / "demo"
    if home.exists():
        shutil.rmtree(home)  # the demo's own sandbox; nothing else lives under it
    home.mkdir(parents=True)
    url = f"sqlite:///{home / 'returns.db'}"
    upgrade(url)
    settings = load_settings({"RETURNS_HOME": str(home), "RETURNS_DATABASE_URL": url})
    pipeline = Pipeline(settings=settings, engine=engine_for(url))
    final = run_sample(InProcess(pipeline))
    summarize(final, home)
    return 0
