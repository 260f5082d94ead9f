"""The main job on embedded defaults: the sample returns driven through their whole life on a replayed clock."""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from adapters.clock import utcnow
from entrypoints.verbs import Direct, ThroughPrefect, Verbs
from models.review import Decision, ReviewReason
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, parse

SAMPLE = Path(__file__).resolve().parent.parent / "sample"

# The sample orders were written for requests arriving at SAMPLE_NOW; the demo moves them to the real clock.
SAMPLE_NOW = datetime.fromisoformat("2026-11-20T10:00:00-05:00")
DUE_SOON_AFTER_RECEIPT = timedelta(days=8, hours=22)  # inside R9's 48 hours before the 10-day deadline
EXPIRED_AFTER_REQUEST = timedelta(days=30, hours=23)  # past R8's 30-day validity

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
OPERATOR = "demo-operator"
REVIEW_AFTER_RECEIPT = "IS-1011"  # damaged in transit back (R12): settled only after the sweeps have escalated it


def shifted_catalog(now: datetime) -> dict[str, Any]:
    """The sample catalogue with every time moved so that its requests arrive at `now`."""
    data: dict[str, Any] = json.loads((SAMPLE / "catalog.json").read_text(encoding="utf-8"))
    delta = now - SAMPLE_NOW
    days = timedelta(days=round(delta / timedelta(days=1)))

    def move(text: str | None) -> str | None:
        return None if text is None else (datetime.fromisoformat(text) + delta).isoformat()

    for order in data["orders"]:
        order["placed_at"], order["delivered_at"] = move(order["placed_at"]), move(order["delivered_at"])
        for pay in order["payments"]:
            pay["captured_at"] = move(pay["captured_at"])
        for line in order["lines"]:
            if line.get("expires_on"):
                line["expires_on"] = (date.fromisoformat(line["expires_on"]) + days).isoformat()
    return data


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_sample(verbs: Verbs, pipeline: Any) -> dict[str, dict[str, Any]]:
    """Drive every sample return through its life; return the final `show` of each, keyed by order number."""
    mail = MailCounter(pipeline)
    samples = json.loads((SAMPLE / "requests.json").read_text(encoding="utf-8"))
    started = utcnow()
    counts = pipeline.import_data(parse(ImportIn, shifted_catalog(started))).as_dict()
    _say(f"imported {counts['products']} products, {counts['customers']} customers, "
         f"{counts['orders_added']} orders (sample dates moved to today)")
    _say("\n== requests arrive from the storefront (P1-P6, R1-R15)")
    by_order: dict[str, str] = {}
    for sample in samples:
        key = f"demo-{started:%Y%m%d%H%M%S}-{sample['request']['order_number']}"  # unique per demo run
        req = parse(ReturnRequestIn, sample["request"] | {"idempotency_key": key})
        out = verbs.request(req)
        _say(f"  {req.order_number:8} {out['decision']:10} {out.get('rma_number') or '-':12} "
             f"refund {out['refund_total']:>7}  [{','.join(out.get('clauses', []))}]  {sample['label']}")
        if out.get("rma_number"):
            by_order[req.order_number] = out["rma_number"]
    mail.report(verbs.relay())

    _say(f"\n== an operator settles the review of {REVIEW_BEFORE_RECEIPT} (R2: expiry checked by hand)")
    out = verbs.review(by_order[REVIEW_BEFORE_RECEIPT], Decision.AUTHORIZE, ReviewReason.EXPIRY_CHECKED,
                       "lot expiry more than a year out", OPERATOR)
    _say(f"  {REVIEW_BEFORE_RECEIPT:8} -> {out['state']}")

    _say("\n== parcels received at Lantana (P7, P8, R12); processing starts at once")
    received_at = utcnow()
    for order, lines in RECEIPTS.items():
        receipt = parse(ReceiptIn, {"rma": by_order[order], "received_at": received_at.isoformat(),
                                    "by": "lantana-dock",
                                    "lines": [{"sku": sku, "unopened": c[0], "opened": c[1], "damaged": c[2],
                                               "missing": c[3]} for sku, c in lines.items()]})
        out = verbs.receive(receipt)
        _say(f"  {order:8} {by_order[order]:12} -> {out['state']}"
             + (f"  refunded {out['refund_total']}" if "refund_total" in out else ""))
    mail.report(verbs.relay())

    for title, as_of in (("R9: due soon", received_at + DUE_SOON_AFTER_RECEIPT),
                         ("R8 expiry, R9 overdue", started + EXPIRED_AFTER_REQUEST)):
        _say(f"\n== deadline sweep replayed as of {as_of.isoformat(timespec='minutes')} ({title})")
        board = verbs.sweep(as_of)["board"]
        _say(f"  states {board['counts']}  due soon {board['due_soon']}  overdue {board['overdue']}")
    mail.report(verbs.relay())

    _say(f"\n== an operator settles {REVIEW_AFTER_RECEIPT} (damaged in transit back, R12)")
    out = verbs.review(by_order[REVIEW_AFTER_RECEIPT], Decision.AUTHORIZE, ReviewReason.DAMAGE_CONFIRMED,
                       "carrier damage; refund in full, claim filed", OPERATOR)
    _say(f"  {REVIEW_AFTER_RECEIPT:8} -> {out['state']}")
    mail.report(verbs.relay())
    return {order: pipeline.show(rma, utcnow()) for order, rma in by_order.items()}


class MailCounter:
    """Emails sent since the last report, whoever sent them (the stages send their own; the relay the rest)."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline, self.sent = pipeline, pipeline.outbox_counts()["sent"]

    def report(self, _relayed: dict[str, Any]) -> None:
        counts = self.pipeline.outbox_counts()
        sent, self.sent = counts["sent"] - self.sent, counts["sent"]
        _say(f"  emails: {sent} sent" + (f", {counts['failed']} FAILED" if counts["failed"] else ""))


def summarize(final: dict[str, dict[str, Any]], home: Path) -> None:
    """The closing table: every return's state and money, and where the documents are."""
    _say("\n== where every return ended")
    for order, shown in final.items():
        paid = ", ".join(" ".join(x for x in (p["method"], p["last4"], p["amount"]) if x)
                         for p in shown["payments_refunded"])
        _say(f"  {order:8} {shown['rma_number']:12} {shown['state']:10} refund {shown['refund_total']:>7}"
             + (f"  to {paid}" if paid else ""))
    _say(f"\n  {len(list((home / 'labels').glob('*.pdf')))} label PDFs in {home / 'labels'}")
    _say(f"  {len(list((home / 'mail').glob('*.eml')))} emails in {home / 'mail'}")


def demo_pipeline() -> Any:
    """A fresh sandbox under RETURNS_HOME/demo (SQLite), migrated; the environment points at it."""
    from adapters.config import load_settings, settings
    from adapters.db import engine_for, upgrade
    from service.steps import Pipeline

    home = load_settings().home / "demo"
    if home.exists():
        shutil.rmtree(home)  # the demo's own sandbox; nothing else lives under it
    home.mkdir(parents=True)
    url = f"sqlite:///{home / 'returns.db'}"
    os.environ["RETURNS_HOME"], os.environ["RETURNS_DATABASE_URL"] = str(home), url
    settings.cache_clear()
    upgrade(url)
    return Pipeline(settings=settings(), engine=engine_for(url))


def run_demo(exit_when_done: bool = True, in_process: bool = False) -> int:
    """`returns demo`: the sample through the served Prefect deployments (or in-process), then a summary."""
    pipeline = demo_pipeline()
    if in_process:
        final = run_sample(Direct(pipeline), pipeline)
        summarize(final, pipeline.settings.home)
        return 0
    from entrypoints.api.app import create_app
    from entrypoints.api.client import Storefront
    from entrypoints.api.config import ApiConfig
    from entrypoints.api.serve import api_thread
    from entrypoints.api.submit import ThroughPrefect as Submit
    from entrypoints.orchestrate import orchestrated

    config = ApiConfig.from_env(pipeline.settings.home)
    with orchestrated(pipeline.settings.home.parent / "prefect") as driver, \
            api_thread(create_app(pipeline, Submit.over(driver.api, pipeline), config), config.host,
                       _free(config.host, config.port)) as api_url:
        storefront = Storefront(api_url, pipeline.create_api_key(f"demo-{utcnow():%Y%m%d%H%M%S}", utcnow()))
        _say(f"storefront API at {api_url} (docs {api_url}/docs, the shopper's page {api_url}/returns)")
        final = run_sample(ThroughApi(storefront, ThroughPrefect(driver.api, pipeline)), pipeline)
        summarize(final, pipeline.settings.home)
        _say(f"\n  Prefect UI: {driver.ui_url}  (flow runs, the 'return-rma-...' artifacts, events)")
        if not exit_when_done:
            _say(f"  serving the API at {api_url} and the deployments; Ctrl-C to stop")
            driver.wait_forever()
    return 0


class ThroughApi:
    """The demo as a storefront: requests through the storefront API (R13 checked there, no email reaches
    Prefect); the dock's and the operators' verbs as runs of their deployments."""

    def __init__(self, storefront: Any, operators: ThroughPrefect) -> None:
        self.storefront, self.operators = storefront, operators

    def request(self, req: ReturnRequestIn) -> dict[str, Any]:
        return dict(self.storefront.request(req, req.idempotency_key or f"demo-{req.order_number}"))

    def __getattr__(self, verb: str) -> Any:
        return getattr(self.operators, verb)


def _free(host: str, port: int) -> int:
    """`port` unless something (a `returns serve`) already listens there; then any free one."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
            return port
        except OSError:
            s.bind((host, 0))
            return int(s.getsockname()[1])
