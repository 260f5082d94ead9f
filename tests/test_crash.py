"""The crash suite: every stage killed by SIGKILL at every crash point it passes, then resumed; nothing is lost and
nothing is paid twice.

Each case runs one stage in a subprocess (tests/crash_driver.py) with RETURNS_CRASH_AT set, expects it to die by
SIGKILL (returncode -9), checks the state the crash left (the point really is where it claims to be, and the
invariants that hold at any moment hold there too), then resumes the way production does - the stage run again,
or the sweep with `as_of` past the processing lease, and the relay - and checks `check_invariants(settled=True)`
plus the suite's own checks: one refund, the gateway paid once per key and exactly what was recorded, every
email delivered once per Message-ID (a resend overwrote its own spool file), every issued label a valid PDF.

SQLite covers every (point x stage); PostgreSQL covers the money points; the Prefect flows are killed inside a
flow run against one real Prefect server for the module and resumed by the sweep flow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader
from sqlalchemy import func, select

from adapters.db import unit_of_work
from adapters.label.layout import label_path
from adapters.mail.transport import eml_name
from adapters.payments.providers import Providers
from models.tables import GatewaySettlement, OutboxMessage, Payment, ProviderRefund, Refund, RefundAllocation, Return
from service.steps import Pipeline
from tests.conftest import SAMPLE, make_pipeline
from tests.crash_driver import run_op
from tests.fake_providers import FakeStripe, serve
from tests.helpers import (
    LATER,
    LOCALSTRIPE_KEY,
    NOW,
    catalog_at_stripe,
    free_port,
    localstripe_refunds,
    paid_intent,
    tally,
)
from tests.invariants import SeenAtProvider, check_invariants, seen_at_stripe

ROOT = Path(__file__).resolve().parent.parent
RESUME = LATER + timedelta(minutes=16)  # past the 15-minute processing lease
RESUME2 = RESUME + timedelta(minutes=16)  # past a lease a crashed sweep re-took at RESUME
RELAY_LATE = RESUME2 + timedelta(hours=2)  # past the relay's 5-minute lease and any backoff a resume left
MONTH_LATER = NOW + timedelta(days=31)  # past every RMA's 30-day validity and every 10-day deadline

UNOPENED = {"IS-1001": [{"sku": "VC-SERUM-30", "unopened": 1}],
            "IS-1002": [{"sku": "PV-SPF50-91", "unopened": 2}],
            "IS-1004": [{"sku": "IL-FIRM-MASK", "damaged": 1}],
            "IS-1007": [{"sku": "PV-SPF32-91", "unopened": 1}],
            "IS-1011": [{"sku": "AG-RET-SRM", "damaged": 1}, {"sku": "IL-FIRM-MASK", "unopened": 1}]}
DAMAGED_BACK = {"IS-1001": [{"sku": "VC-SERUM-30", "damaged": 1}]}  # P3 damaged in transit back: review (R12)

TALLY = tally("crash")


# ---- ops and placeholders --------------------------------------------------------------------------------------


def req(order: str, now: datetime = NOW, **kw: Any) -> dict[str, Any]:
    return {"op": "request", "order": order, "now": now.isoformat(), **kw}


def rcv(order: str, lines: list[dict[str, Any]] | None = None, now: datetime = LATER, key: str | None = None,
        **kw: Any) -> dict[str, Any]:
    return {"op": "receive", "rma": f"@{key or order}", "lines": lines or UNOPENED[order], "now": now.isoformat(), **kw}


def sweep(as_of: datetime, **kw: Any) -> dict[str, Any]:
    return {"op": "sweep", "as_of": as_of.isoformat(), **kw}


def relay(now: datetime) -> dict[str, Any]:
    return {"op": "relay", "now": now.isoformat()}


def rma_for(p: Pipeline, key: str) -> str:
    """The RMA of the return requested with idempotency key crash-<key>."""
    with unit_of_work(p.engine) as s:
        rma = s.scalars(select(Return.rma).where(Return.idempotency_key == f"crash-{key}")).one()
    assert rma
    return rma


def resolve(p: Pipeline, obj: Any) -> Any:
    """Replace "@<key>" strings (anywhere in an op) by the RMA requested under idempotency key crash-<key>."""
    if isinstance(obj, str) and obj.startswith("@"):
        return rma_for(p, obj[1:])
    if isinstance(obj, dict):
        return {k: resolve(p, v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve(p, v) for v in obj]
    return obj


# ---- running a stage in its own process ------------------------------------------------------------------------


def driver_env(home: Path, url: str, crash_at: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETURNS_", "PREFECT_API"))}
    env |= {"RETURNS_HOME": str(home), "RETURNS_DATABASE_URL": url, "PYTHONPATH": str(ROOT),
            "PREFECT_HOME": str(home.parent / "prefect-client"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1"}
    if crash_at:
        env["RETURNS_CRASH_AT"] = crash_at
    return env | (extra or {})


def run_stage(p: Pipeline, ops: list[dict[str, Any]], crash_at: str | None,
              extra_env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.crash_driver", json.dumps(resolve(p, ops))],
        cwd=ROOT, env=driver_env(p.settings.home, p.settings.database_url, crash_at, extra_env),
        capture_output=True, text=True, timeout=timeout,
    )
    TALLY["subprocess runs"] += 1
    return proc


def crash(p: Pipeline, ops: list[dict[str, Any]], point: str, extra_env: dict[str, str] | None = None) -> None:
    """Run the stage with the crash point armed; it must die by SIGKILL, not finish or fail on its own."""
    proc = run_stage(p, ops, point, extra_env)
    assert proc.returncode == -9, (
        f"expected SIGKILL at {point}, got returncode {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}")
    TALLY["crashes (SIGKILL observed)"] += 1


# ---- what the world looks like ---------------------------------------------------------------------------------


def valid_pdf(path: Path, rma: str) -> bool:
    data = path.read_bytes()
    if not data.startswith(b"%PDF-") or b"%%EOF" not in data[-64:]:
        return False
    reader = PdfReader(path)
    return len(reader.pages) == 1 and rma in (reader.pages[0].extract_text() or "")


def snapshot(p: Pipeline, rma: str | None) -> dict[str, Any]:
    """The facts a crash point promises: the target return's state and money, the outbox, the files."""
    home = p.settings.home
    with unit_of_work(p.engine) as s:
        ret = s.scalars(select(Return).where(Return.rma == rma)).first() if rma else None
        outbox = Counter(s.scalars(select(OutboxMessage.status)))
        snap: dict[str, Any] = {
            "sent": outbox["sent"], "pending": outbox["pending"], "failed": outbox["failed"],
            "expired": s.scalar(select(func.count()).select_from(Return).where(Return.state == "expired")),
            "overdue_flagged": s.scalar(select(func.count()).select_from(Return)
                                        .where(Return.overdue_flagged_at.is_not(None))),  # type: ignore[union-attr]
        }
        if ret is not None:
            refund = s.scalars(select(Refund).where(Refund.return_id == ret.id)).first()
            snap |= {
                "state": ret.state,
                "settlements": s.scalar(select(func.count()).select_from(GatewaySettlement).where(
                    GatewaySettlement.idempotency_key.like(f"refund:{rma}:%"))),  # type: ignore[attr-defined]
                "refunds": s.scalar(select(func.count()).select_from(Refund).where(Refund.return_id == ret.id)),
                "attempts": s.scalar(select(func.count()).select_from(ProviderRefund)
                                     .where(ProviderRefund.return_id == ret.id)),
                "refund_cents": refund.amount_cents if refund else None,
            }
    labels = home / "labels"
    snap["emls"] = len(list((home / "mail").glob("*.eml"))) if (home / "mail").exists() else 0
    snap["label_tmp"] = len(list(labels.glob(".*.tmp"))) if labels.exists() else 0
    if rma:
        path = label_path(labels, rma)
        snap["label"] = path.exists() and valid_pdf(path, rma)
    return snap


def assert_subset(actual: dict[str, Any], expected: dict[str, Any], when: str) -> None:
    wrong = {k: (actual.get(k), v) for k, v in expected.items() if actual.get(k) != v}
    assert not wrong, f"{when}: (actual, expected) differ: {wrong}\nsnapshot: {actual}"
    TALLY["state checks"] += len(expected)


def settled_checks(p: Pipeline) -> int:
    """The suite's own checks once everything is at rest, on top of tests/invariants.py."""
    home = p.settings.home
    n = 0
    with unit_of_work(p.engine) as s:
        returns = list(s.scalars(select(Return)))
        settlements = {g.idempotency_key: g for g in s.scalars(select(GatewaySettlement))}
        refunds = {f.return_id: f for f in s.scalars(select(Refund))}
        allocations = list(s.scalars(select(RefundAllocation)))
        outbox = list(s.scalars(select(OutboxMessage)))
        at_provider = set(s.scalars(select(Payment.id).where(Payment.provider != "ledger")))
    by_refund: dict[int, list[RefundAllocation]] = {}
    for a in allocations:
        by_refund.setdefault(a.refund_id, []).append(a)
    recorded_keys = set()
    for r in returns:
        refund = refunds.get(r.id or 0)
        if r.state == "completed":
            # exactly one refund, its allocations add up, each paid by the gateway under its key, once
            assert refund is not None, f"{r.rma} completed without a refund row"
            allocs = by_refund.get(refund.id or 0, [])
            assert sum(a.amount_cents for a in allocs) == refund.amount_cents == r.refund_total_cents, r.rma
            for a in allocs:
                if a.payment_id in at_provider:  # paid at Stripe: invariants.py holds it against Stripe's record
                    continue
                key = f"refund:{r.rma}:{a.payment_id}"
                recorded_keys.add(key)
                g = settlements.get(key)
                assert g is not None and g.amount_cents == a.amount_cents and g.payment_id == a.payment_id, key
                assert a.gateway_reference == f"ledger-{g.id}", f"{key}: recorded reference is not the gateway's"
                n += 1
            n += 2
        else:
            assert refund is None, f"{r.rma} in {r.state} has a refund"
            n += 1
        if r.rma_issued_at is not None:  # every RMA ever issued has its label, a whole PDF
            path = label_path(home / "labels", r.rma or "")
            assert path.exists() and valid_pdf(path, r.rma or ""), f"{r.rma}: label missing or not a valid PDF"
            n += 1
    assert set(settlements) == recorded_keys, f"gateway paid keys nothing recorded: {set(settlements) - recorded_keys}"
    n += 1
    # every email delivered: one spool file per outbox row, named by its Message-ID, carrying that Message-ID
    files = {f.name: f for f in (home / "mail").glob("*.eml")} if (home / "mail").exists() else {}
    assert len(files) == len(outbox), f"{len(files)} .eml files for {len(outbox)} outbox rows"
    for m in outbox:
        f = files.get(eml_name(m.message_id))
        assert f is not None, f"outbox {m.key} ({m.kind}) never reached the spool"
        assert message_from_bytes(f.read_bytes())["Message-ID"] == m.message_id
        n += 1
    assert not list((home / "mail").glob(".*.tmp")) if (home / "mail").exists() else True
    # a label write killed mid-way leaves its temp file (it holds an address) only until the label is written
    assert not list((home / "labels").glob(".*.tmp")) if (home / "labels").exists() else True
    return n + 3


def settle_and_check(p: Pipeline, resume: list[dict[str, Any]], final: dict[str, Any], rma: str | None,
                     last_relay: datetime = RELAY_LATE + timedelta(hours=6),
                     record: Callable[[], list[SeenAtProvider]] | None = None) -> None:
    for op in resolve(p, resume):
        run_op(p, op)
    TALLY["resumes"] += 1
    run_op(p, relay(last_relay))  # anything still waiting on a backoff
    assert_subset(snapshot(p, rma), final, "after resume")
    TALLY["check_invariants calls"] += 1
    TALLY["invariants.py checks"] += check_invariants(p, settled=True, mail_dir=p.settings.home / "mail",
                                                      at_provider=record() if record else None)
    TALLY["suite settled checks"] += settled_checks(p)
    TALLY["scenarios settled"] += 1


# ---- the cases -------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One stage killed at one point: the setup (run in-process, no crash), the stage (in a subprocess, crashed),
    what the crash must have left, the resume, and where the target return must end."""

    id: str
    setup: list[dict[str, Any]]
    stage: list[dict[str, Any]]
    point: str
    target: str | None  # idempotency key (crash-<target>) of the return the stage is about
    mid: dict[str, Any]
    resume: list[dict[str, Any]]
    final: dict[str, Any]
    before: Callable[[Pipeline], None] | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.id


IMPORT = [{"op": "import", "data": json.loads((SAMPLE / "catalog.json").read_text("utf-8"))}]
SWEEP_RESUME = [sweep(RESUME), relay(RELAY_LATE)]
PAID_1002 = {"state": "completed", "refunds": 1, "settlements": 2, "refund_cents": 8004}


def request_cases() -> list[Case]:
    out = []
    for order, state in (("IS-1001", "authorized"), ("IS-1003", "declined"), ("IS-1006", "review")):
        issued = state == "authorized"
        out.append(Case(f"request-{order}-{state}@request.after-commit/rerun", IMPORT, [req(order)],
                        "request.after-commit", order if order != "IS-1003" else None,
                        {"pending": 1, "sent": 0, "emls": 0} | ({"state": state, "label": False} if issued else {}),
                        [req(order, now=NOW + timedelta(minutes=1))],  # the storefront retries: same key
                        {"pending": 0, "sent": 1, "emls": 1} | ({"state": state, "label": True} if issued else {})))
    out += [
        Case("request@request.after-commit/sweep", IMPORT, [req("IS-1001")], "request.after-commit", "IS-1001",
             {"state": "authorized", "label": False, "emls": 0}, SWEEP_RESUME,
             {"state": "authorized", "label": True, "sent": 1, "emls": 1}),
        Case("request@label.during-write/rerun", IMPORT, [req("IS-1001")], "label.during-write", "IS-1001",
             {"state": "authorized", "label": False, "label_tmp": 1, "emls": 0},
             [req("IS-1001", now=NOW + timedelta(minutes=1))], {"state": "authorized", "label": True, "emls": 1}),
        Case("request-replacement@label.during-write/sweep", IMPORT, [req("IS-1004")], "label.during-write", "IS-1004",
             {"state": "authorized", "label": False, "label_tmp": 1}, SWEEP_RESUME,
             {"state": "authorized", "label": True, "emls": 1}),
        Case("request@relay.after-send", IMPORT, [req("IS-1001")], "relay.after-send", "IS-1001",
             {"state": "authorized", "label": True, "emls": 1, "sent": 0, "pending": 1}, [relay(NOW)],
             {"emls": 1, "sent": 1}),  # relay(NOW) inside the 5-min lease sends nothing; RELAY_LATE resends
    ]
    return out


def money_points(settle_n: int) -> list[tuple[str, dict[str, Any]]]:
    """The processing points, each with what it must leave behind (settle_n: the gateway calls the refund makes)."""
    pts: list[tuple[str, dict[str, Any]]] = [
        ("process.after-claim", {"state": "processing", "settlements": 0, "refunds": 0}),
        ("process.before-pay", {"state": "processing", "settlements": 0, "refunds": 0}),
    ]
    pts += [(f"gateway.after-settle@{i}", {"state": "processing", "settlements": i, "refunds": 0})
            for i in range(1, settle_n + 1)]
    pts += [
        ("process.after-pay", {"state": "processing", "settlements": settle_n, "refunds": 0}),
        ("process.after-commit", {"state": "completed", "settlements": settle_n, "refunds": 1}),
    ]
    return pts


def receive_cases() -> list[Case]:
    setup = IMPORT + [req("IS-1002")]
    # The receipt and the claim are one transaction: a crash after it leaves the return processing, for the sweep.
    cases = [Case("dock@receive.after-commit", setup, [rcv("IS-1002")], "receive.after-commit", "IS-1002",
                  {"state": "processing", "settlements": 0}, SWEEP_RESUME, PAID_1002)]
    cases += [Case(f"dock@{pt}", setup, [rcv("IS-1002")], pt, "IS-1002", mid, SWEEP_RESUME, PAID_1002)
              for pt, mid in money_points(2) if pt != "process.after-claim"]  # the receipt claims, no claim()
    # relay after the dock: 'received' then 'processed' (the rma_issued one went out in the setup)
    cases += [Case(f"dock@relay.after-send@{n}", setup, [rcv("IS-1002")], f"relay.after-send@{n}", "IS-1002",
                   {"state": "completed", "sent": n - 1, "emls": n}, [relay(LATER)], PAID_1002 | {"sent": 3})
              for n in (1, 2)]
    cases += [
        Case("dock-review@receive.after-commit", IMPORT + [req("IS-1011")], [rcv("IS-1011")], "receive.after-commit",
             "IS-1011", {"state": "review"}, SWEEP_RESUME, {"state": "review", "refunds": 0, "settlements": 0}),
        Case("dock-replacement@process.after-pay", IMPORT + [req("IS-1004")], [rcv("IS-1004")], "process.after-pay",
             "IS-1004", {"state": "processing", "settlements": 0}, SWEEP_RESUME,
             {"state": "completed", "refunds": 1, "settlements": 0, "refund_cents": 0}),
    ]
    return cases


def process_cases() -> list[Case]:
    setup = IMPORT + [req("IS-1007"), rcv("IS-1007", process=False)]
    stage = [{"op": "process", "rma": "@IS-1007", "now": LATER.isoformat()}]
    final = {"state": "completed", "refunds": 1, "settlements": 1, "refund_cents": 400}
    cases = [Case(f"process-exchange@{pt}", setup, stage, pt, "IS-1007", mid, SWEEP_RESUME, final)
             for pt, mid in money_points(1)]
    # "run the stage again": the operator presses process once the lease has run out
    cases.append(Case("process-exchange@process.after-pay/rerun", setup, stage, "process.after-pay", "IS-1007",
                      {"state": "processing", "settlements": 1, "refunds": 0},
                      [{"op": "process", "rma": "@IS-1007", "now": RESUME.isoformat()}], final))
    return cases


def review_cases() -> list[Case]:
    setup = IMPORT + [req("IS-1011"), rcv("IS-1011")]  # damaged in transit back: review after receipt
    stage = [{"op": "review", "rma": "@IS-1011", "now": (LATER + timedelta(hours=1)).isoformat()}]
    final = {"state": "completed", "refunds": 1, "settlements": 1, "refund_cents": 13268}
    resume = [sweep(LATER + timedelta(hours=1, minutes=16)), relay(RELAY_LATE)]
    cases = [Case(f"review-after-receipt@{pt}", setup, stage, pt, "IS-1011", mid, resume, final)
             for pt, mid in money_points(1) if pt != "process.after-claim"]  # settling a review claims, no claim()
    cases.append(Case("review-before-receipt@label.during-write", IMPORT + [req("IS-1006")],
                      [{"op": "review", "rma": "@IS-1006", "now": NOW.isoformat()}], "label.during-write", "IS-1006",
                      {"state": "authorized", "label": False, "label_tmp": 1}, SWEEP_RESUME,
                      {"state": "authorized", "label": True}))
    return cases


def redrive_cases() -> list[Case]:
    # a worker claimed IS-1002 at LATER and died; the sweep at RESUME re-drives it and is itself killed
    setup = IMPORT + [req("IS-1002"), rcv("IS-1002", process=False), {"op": "claim", "rma": "@IS-1002",
                                                                       "now": LATER.isoformat()}]
    resume = [sweep(RESUME2), relay(RELAY_LATE)]
    return [Case(f"sweep-redrive@{pt}", setup, [sweep(RESUME)], pt, "IS-1002", mid, resume, PAID_1002)
            for pt, mid in money_points(2)]


def sweep_cases() -> list[Case]:
    # three authorized RMAs to expire and two returns in review after receipt to flag overdue, in one sweep
    setup = IMPORT + [req(o) for o in ("IS-1001", "IS-1002", "IS-1004", "IS-1007", "IS-1011")] + [
        rcv("IS-1001", DAMAGED_BACK["IS-1001"]), rcv("IS-1011")]
    resume = [sweep(MONTH_LATER), relay(MONTH_LATER + timedelta(hours=1))]
    final = {"expired": 3, "overdue_flagged": 2}
    cases = [Case(f"sweep-batch@sweep.mid@{n}", setup, [sweep(MONTH_LATER)], f"sweep.mid@{n}", None,
                  {"expired": min(n - 1, 3), "overdue_flagged": max(n - 4, 0)}, resume, final)
             for n in (1, 2, 4, 5)]
    cases.append(Case("sweep-labels@label.during-write", IMPORT + [req("IS-1001", label=False, relay=False)],
                      [sweep(NOW + timedelta(hours=1))], "label.during-write", "IS-1001",
                      {"label": False, "label_tmp": 1, "emls": 0}, [sweep(NOW + timedelta(hours=2))],
                      {"state": "authorized", "label": True, "emls": 1}))
    return cases


def relay_cases() -> list[Case]:
    setup = IMPORT + [req(o, relay=False) for o in ("IS-1001", "IS-1002", "IS-1003", "IS-1006")]
    return [Case(f"relay-batch@relay.after-send@{n}", setup, [relay(NOW)], f"relay.after-send@{n}", None,
                 {"sent": n - 1, "pending": 5 - n, "emls": n}, [relay(NOW + timedelta(minutes=1))],
                 {"sent": 4, "pending": 0, "emls": 4}) for n in (1, 3)]


def sibling_cases() -> list[Case]:
    """Two RMAs on one order (R11 allows it) refunded from two payments (R10): A dies after the gateway paid it (or
    just before), and B's parcel reaches the dock before anyone resumes A. B must not be planned against room that
    A's unrecorded payment already used (B waits while A is processing, 8e2179d); the sweep finishes both, each
    paid once, no payment refunded beyond its capture."""
    one = [{"sku": "PV-SPF50-91", "quantity": 1, "unopened": True}]
    setup = IMPORT + [req("IS-1002", changes={"lines": one, "idempotency_key": f"crash-IS-1002-{x}"}) for x in "ab"]
    lines = [{"sku": "PV-SPF50-91", "unopened": 1}]
    stage = [rcv("IS-1002", lines, key="IS-1002-a")]
    resume = [rcv("IS-1002", lines, now=LATER + timedelta(minutes=1), key="IS-1002-b"), *SWEEP_RESUME]
    return [Case(f"sibling-returns@{pt}", setup, stage, pt, "IS-1002-a", mid, resume,
                 {"state": "completed", "refunds": 1, "settlements": 1, "refund_cents": 4002})
            for pt, mid in (("process.after-pay", {"state": "processing", "settlements": 1, "refunds": 0}),
                            ("process.before-pay", {"state": "processing", "settlements": 0, "refunds": 0}))]


SQLITE_CASES = (sibling_cases() + request_cases() + receive_cases() + process_cases() + review_cases()
                + redrive_cases() + sweep_cases() + relay_cases())
PG_CASES = [c for c in sibling_cases() + receive_cases() + redrive_cases()
            if c.point in ("process.after-pay", "process.after-commit", "gateway.after-settle@1")]


def run_case(case: Case, p: Pipeline) -> None:
    for op in case.setup:
        run_op(p, resolve(p, op))
    before = snapshot(p, None)
    crash(p, case.stage, case.point)
    TALLY[f"point {case.point.split('@')[0]}"] += 1
    TALLY["check_invariants calls"] += 1
    TALLY["invariants.py checks"] += check_invariants(p, settled=False, mail_dir=p.settings.home / "mail")
    rma = rma_for(p, case.target) if case.target else None
    mid = dict(case.mid)
    if case.point.startswith("relay"):  # a relay point's counts are those the stage itself added
        for k in ("sent", "emls"):
            if k in mid:
                mid[k] += before[k]
    assert_subset(snapshot(p, rma), mid, f"crashed at {case.point}")
    final = dict(case.final)
    settle_and_check(p, case.resume, final, rma)


@pytest.mark.parametrize("case", SQLITE_CASES, ids=str)
def test_crash_and_resume_sqlite(case: Case, tmp_path: Path) -> None:
    run_case(case, make_pipeline(tmp_path / "home", f"sqlite:///{tmp_path / 'returns.db'}"))


@pytest.mark.postgres
@pytest.mark.parametrize("case", PG_CASES, ids=str)
def test_crash_and_resume_postgres(case: Case, tmp_path: Path, pg_url: str) -> None:
    run_case(case, make_pipeline(tmp_path / "home", pg_url))


# ---- the Stripe adapter: killed between Stripe's yes and our record ------------------------------------------------


@dataclass
class StripeCase:
    """A stage over payments at Stripe killed at one point, resumed, and (`later`) what the provider or a person
    does next. `fake`: the loopback fake of Stripe's documented idempotency, else a real localstripe."""

    id: str
    order: str
    setup: list[dict[str, Any]]  # after the import and the request
    stage: list[dict[str, Any]]
    point: str
    mid: dict[str, Any]
    resume: list[dict[str, Any]]
    final: dict[str, Any]
    fake: bool = False
    refund_status: str = "succeeded"  # the fake: what a new refund starts as
    refuse: bool = False  # the fake: Stripe declines every refund of the charge (402) until `later` lifts it
    prune: bool = False  # the fake: more than 24 hours pass before the resume, Stripe forgets every key
    later: str | None = None  # the fake: "succeeded" / "failed" (the pending refund settles) or "fixed" (card updated)
    later_ops: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)  # where the return ends after `later`

    def __str__(self) -> str:
        return self.id


# IS-1002 refunds 80.04: 73.53 on the newer intent, then 6.51 on the older one (R10); IS-1001 refunds 72.76.
CAPTURES = {"IS-1002": [7352, 7353], "IS-1001": [19520]}
AT_STRIPE_1002 = {"state": "completed", "refunds": 1, "attempts": 2, "at_stripe": 2, "settlements": 0,
                  "refund_cents": 8004}
AT_STRIPE_1001 = {"state": "completed", "refunds": 1, "attempts": 1, "at_stripe": 1, "settlements": 0,
                  "refund_cents": 7276}
AUTHORIZE = [{"op": "review", "rma": "@IS-1001", "now": RESUME2.isoformat()}, relay(RELAY_LATE)]


def stripe_cases() -> list[StripeCase]:
    dock = [rcv("IS-1002")]
    cases = [
        StripeCase("dock@provider.after-refund@1", "IS-1002", [], dock, "provider.after-refund@1",
                   {"state": "processing", "attempts": 0, "at_stripe": 1}, SWEEP_RESUME, AT_STRIPE_1002),
        StripeCase("dock@provider.after-refund@2", "IS-1002", [], dock, "provider.after-refund@2",
                   {"state": "processing", "attempts": 1, "at_stripe": 2}, SWEEP_RESUME, AT_STRIPE_1002),
        StripeCase("dock@process.after-pay", "IS-1002", [], dock, "process.after-pay",
                   {"state": "processing", "attempts": 2, "at_stripe": 2, "refunds": 0}, SWEEP_RESUME, AT_STRIPE_1002),
        StripeCase("dock@process.after-commit", "IS-1002", [], dock, "process.after-commit",
                   {"state": "completed", "attempts": 2, "at_stripe": 2, "refunds": 1}, SWEEP_RESUME, AT_STRIPE_1002),
        # the operator presses "process" again once the lease has run out
        StripeCase("process@provider.after-refund@1/rerun", "IS-1002", [rcv("IS-1002", process=False)],
                   [{"op": "process", "rma": "@IS-1002", "now": LATER.isoformat()}], "provider.after-refund@1",
                   {"state": "processing", "attempts": 0, "at_stripe": 1},
                   [{"op": "process", "rma": "@IS-1002", "now": RESUME.isoformat()}, relay(RELAY_LATE)],
                   AT_STRIPE_1002),
        # a worker claimed it and died; the sweep re-driving it dies too, after Stripe's second yes
        StripeCase("sweep-redrive@provider.after-refund@2", "IS-1002",
                   [rcv("IS-1002", process=False), {"op": "claim", "rma": "@IS-1002", "now": LATER.isoformat()}],
                   [sweep(RESUME)], "provider.after-refund@2", {"state": "processing", "attempts": 1, "at_stripe": 2},
                   [sweep(RESUME2), relay(RELAY_LATE)], AT_STRIPE_1002),
    ]
    fake = [rcv("IS-1001")]
    cases += [
        # Stripe's idempotency window passed before the resume: only the lookup by merchant reference stands
        # between the retry and a second refund
        StripeCase("fake/dock@provider.after-refund/key-pruned", "IS-1001", [], fake, "provider.after-refund",
                   {"state": "processing", "attempts": 0, "at_stripe": 1}, SWEEP_RESUME,
                   AT_STRIPE_1001 | {"creates": 1}, fake=True, prune=True),
        # pending at Stripe when the worker died: the resume records it and waits; the sweep completes it once
        # Stripe says succeeded, or parks it for a person once Stripe says failed, who authorizes it again
        StripeCase("fake/dock@provider.after-refund/pending-then-succeeded", "IS-1001", [], fake,
                   "provider.after-refund", {"state": "processing", "attempts": 0, "at_stripe": 1}, SWEEP_RESUME,
                   {"state": "processing", "attempts": 1, "at_stripe": 1, "refunds": 0}, fake=True,
                   refund_status="pending", prune=True, later="succeeded",
                   later_ops=[sweep(RESUME2), relay(RELAY_LATE)], last=AT_STRIPE_1001 | {"creates": 1}),
        StripeCase("fake/dock@provider.after-refund/pending-then-failed", "IS-1001", [], fake,
                   "provider.after-refund", {"state": "processing", "attempts": 0, "at_stripe": 1}, SWEEP_RESUME,
                   {"state": "processing", "attempts": 1, "at_stripe": 1, "refunds": 0}, fake=True,
                   refund_status="pending", later="failed",
                   later_ops=[sweep(RESUME2), relay(RELAY_LATE), *AUTHORIZE],
                   last=AT_STRIPE_1001 | {"attempts": 2, "creates": 2}),
        # declined (402) at once: the resume meets the same answer (Stripe replays it under the key) and parks it
        StripeCase("fake/dock@provider.after-refund/declined", "IS-1001", [], fake, "provider.after-refund",
                   {"state": "processing", "attempts": 0, "at_stripe": 0}, SWEEP_RESUME,
                   {"state": "review", "attempts": 1, "at_stripe": 0, "refunds": 0}, fake=True, refuse=True,
                   later="fixed", later_ops=AUTHORIZE, last=AT_STRIPE_1001 | {"attempts": 2}),
    ]
    return cases


STRIPE_CASES = stripe_cases()
PG_STRIPE_CASES = [c for c in STRIPE_CASES if c.id in ("dock@provider.after-refund@1",
                                                       "fake/dock@provider.after-refund/key-pruned")]


@dataclass
class AtStripe:
    """Where the case's payments live: localstripe's base URL or the fake (and its URL), and the intents."""

    url: str
    fake: FakeStripe | None
    intents: list[str]

    def env(self) -> dict[str, str]:
        return {"RETURNS_STRIPE_API_KEY": self.fake.api_key if self.fake else LOCALSTRIPE_KEY,
                "RETURNS_STRIPE_API_BASE": self.url}

    def record(self) -> list[SeenAtProvider]:
        """Stripe's own record of the case's refunds (not ours)."""
        if self.fake is not None:
            with self.fake.lock:
                return seen_at_stripe([dict(r) for r in self.fake.refunds.values()])
        return seen_at_stripe([r for pi in self.intents for r in localstripe_refunds(self.url, pi)])


def at_stripe(case: StripeCase, url: str, fake: FakeStripe | None) -> AtStripe:
    if fake is None:
        return AtStripe(url, None, [paid_intent(url, amount) for amount in CAPTURES[case.order]])
    charges = [fake.add_payment(amount, refund_status=case.refund_status,
                                refuse=(402, "card_error", "card_declined") if case.refuse else None)
               for amount in CAPTURES[case.order]]
    return AtStripe(url, fake, [ch.intent for ch in charges])


def stripe_snapshot(p: Pipeline, rma: str, where: AtStripe) -> dict[str, Any]:
    live = [r for r in where.record() if (r.merchant_reference or "").startswith(f"{rma}-")
            and r.status not in ("failed", "canceled")]
    snap = snapshot(p, rma) | {"at_stripe": len(live)}
    if where.fake is not None:
        snap["creates"] = len(where.fake.creates("/v1/refunds"))
    return snap


def run_stripe_case(case: StripeCase, base: Pipeline, url: str, fake: FakeStripe | None) -> None:
    where = at_stripe(case, url, fake)
    # the test process resumes with the same configuration the killed process had: Stripe from the environment
    p = Pipeline(settings=base.settings, engine=base.engine,
                 providers=Providers(base.engine, env=where.env(), secrets=lambda name: None, timeout=5.0))
    catalog = catalog_at_stripe(IMPORT[0]["data"], {case.order: where.intents})
    for op in [{"op": "import", "data": catalog}, req(case.order), *case.setup]:
        run_op(p, resolve(p, op))
    crash(p, case.stage, case.point, where.env())
    TALLY[f"point {case.point.split('@')[0]}"] += 1
    TALLY["stripe crashes"] += 1
    TALLY["check_invariants calls"] += 1
    TALLY["invariants.py checks"] += check_invariants(p, mail_dir=p.settings.home / "mail", at_provider=where.record())
    rma = rma_for(p, case.order)
    assert_subset(stripe_snapshot(p, rma, where), case.mid, f"crashed at {case.point}")
    if case.prune:
        assert fake is not None
        fake.prune_keys()
    for op in resolve(p, case.resume):
        run_op(p, op)
    assert_subset(stripe_snapshot(p, rma, where), case.final, "after resume")
    if case.later:
        assert fake is not None
        if case.later == "fixed":
            for ch in fake.charges.values():
                ch.refuse = None
        else:
            with unit_of_work(p.engine) as s:
                [ref] = s.scalars(select(ProviderRefund.provider_ref).join(Return).where(Return.rma == rma))
            assert ref is not None
            fake.settle(ref, case.later, "expired_or_canceled_card" if case.later == "failed" else None)
            for ch in fake.charges.values():
                ch.refund_status = "succeeded"  # the operator's later attempt goes through
        if case.later != "succeeded":
            TALLY["stripe refunds parked, then authorized"] += 1
        for op in resolve(p, case.later_ops):
            run_op(p, op)
        assert_subset(stripe_snapshot(p, rma, where), case.last, "after the provider and the operator")
    # one live refund per payment at Stripe, never beyond a capture, exactly what we recorded
    settle_and_check(p, [], {}, rma, record=where.record)
    TALLY["stripe refunds at Stripe"] += len([r for r in where.record() if r.status == "succeeded"])


@pytest.fixture
def stripe_fake() -> Iterator[tuple[FakeStripe, str]]:
    fake = FakeStripe()
    with serve(fake) as url:
        yield fake, url


def _stripe_case(case: StripeCase, p: Pipeline, request: pytest.FixtureRequest) -> None:
    if case.fake:
        fake, url = request.getfixturevalue("stripe_fake")
        run_stripe_case(case, p, url, fake)
    else:
        run_stripe_case(case, p, request.getfixturevalue("localstripe"), None)


@pytest.mark.parametrize("case", STRIPE_CASES, ids=str)
def test_stripe_crash_and_resume_sqlite(case: StripeCase, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    _stripe_case(case, make_pipeline(tmp_path / "home", f"sqlite:///{tmp_path / 'returns.db'}"), request)


@pytest.mark.postgres
@pytest.mark.parametrize("case", PG_STRIPE_CASES, ids=str)
def test_stripe_crash_and_resume_postgres(case: StripeCase, tmp_path: Path, pg_url: str,
                                          request: pytest.FixtureRequest) -> None:
    _stripe_case(case, make_pipeline(tmp_path / "home", pg_url), request)


# ---- the Prefect flows, killed inside a flow run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One real Prefect server for the module (an ephemeral API per subprocess would cost ~8 s each)."""
    from entrypoints.prefect_server import prefect_env, start_server, stop_server

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    proc = start_server(home, port=port)
    try:
        env = prefect_env(home, port)
        yield {k: env[k] for k in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")} | {
            "PREFECT_LOGGING_LEVEL": "ERROR"}
    finally:
        stop_server(proc)


@dataclass
class FlowCase:
    id: str
    order: str
    stage: str  # flow-request | flow-receipt
    point: str
    mid: dict[str, Any]
    resume: str  # the flow that resumes: flow-sweep | flow-relay
    clock_offset_minutes: int  # how far the resuming flow's clock is past the crash (a lease must have run out)
    final: dict[str, Any]

    def __str__(self) -> str:
        return self.id


FLOW_CASES = [
    FlowCase("record-receipt@process.after-pay/deadline-sweep", "IS-1002", "flow-receipt", "process.after-pay",
             {"state": "processing", "settlements": 2, "refunds": 0}, "flow-sweep", 16, PAID_1002 | {"sent": 3}),
    FlowCase("record-receipt@process.after-commit/deadline-sweep", "IS-1002", "flow-receipt", "process.after-commit",
             {"state": "completed", "settlements": 2, "refunds": 1}, "flow-sweep", 0, PAID_1002 | {"sent": 3}),
    FlowCase("record-receipt@relay.after-send/outbox-relay", "IS-1001", "flow-receipt", "relay.after-send",
             {"state": "completed", "sent": 0, "emls": 1}, "flow-relay", 6,
             {"state": "completed", "refunds": 1, "settlements": 1, "refund_cents": 7276, "sent": 3, "emls": 3}),
    FlowCase("request-return@label.during-write/deadline-sweep", "IS-1001", "flow-request", "label.during-write",
             {"state": "authorized", "label": False, "label_tmp": 1, "emls": 0}, "flow-sweep", 0,
             {"state": "authorized", "label": True, "sent": 1, "emls": 1}),
]


@pytest.mark.prefect
@pytest.mark.slow
@pytest.mark.parametrize("case", FLOW_CASES, ids=str)
def test_flow_crash_and_resume_under_a_prefect_server(case: FlowCase, tmp_path: Path,
                                                      prefect_api: dict[str, str]) -> None:
    """The stage flow is killed inside its flow run (the server keeps a run that never finishes); the sweep or
    relay flow, a new flow run in a new process, finishes the work."""
    from entrypoints.demo import shifted_catalog

    p = make_pipeline(tmp_path / "home", f"sqlite:///{tmp_path / 'returns.db'}")
    start = datetime.now(UTC)
    run_op(p, {"op": "import", "data": shifted_catalog(start)})
    if case.stage == "flow-receipt":
        run_op(p, req(case.order, now=start))
        stage = {"op": "flow-receipt", "rma": rma_for(p, case.order), "lines": UNOPENED[case.order],
                 "received_at": datetime.now(UTC).isoformat()}
    else:
        stage = {"op": "flow-request", "order": case.order}
    before = snapshot(p, None)
    crash(p, [stage], case.point, prefect_api)
    TALLY[f"point {case.point.split('@')[0]}"] += 1
    TALLY["flow crashes"] += 1
    TALLY["check_invariants calls"] += 1
    TALLY["invariants.py checks"] += check_invariants(p, settled=False, mail_dir=p.settings.home / "mail")
    mid = dict(case.mid)
    if case.point.startswith("relay"):
        mid = mid | {k: mid[k] + before[k] for k in ("sent", "emls") if k in mid}
    rma = rma_for(p, case.order)
    assert_subset(snapshot(p, rma), mid, f"flow crashed at {case.point}")
    proc = run_stage(p, [{"op": case.resume, "clock_offset_minutes": case.clock_offset_minutes}], None, prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    TALLY["flow resumes"] += 1
    settle_and_check(p, [], case.final, rma, last_relay=datetime.now(UTC) + timedelta(hours=3))


def test_every_crash_point_is_exercised() -> None:
    """A point in the code or in adapters/crashpoints.py without a case here (or not listed there) fails this test."""
    from adapters.crashpoints import POINTS

    sources = [f for pkg in ("models", "adapters", "service", "tasks", "flows", "entrypoints")
               for f in (ROOT / pkg).rglob("*.py")]
    in_code = {m for f in sources for m in re.findall(r'crash_point\("([^"@]+)"\)', f.read_text("utf-8"))}
    assert in_code == set(POINTS), f"in the code, not listed: {in_code - set(POINTS)}; listed, not in the code: " \
                                   f"{set(POINTS) - in_code}"
    covered = {c.point.split("@")[0] for c in SQLITE_CASES} | {c.point.split("@")[0] for c in STRIPE_CASES}
    assert covered == set(POINTS)

