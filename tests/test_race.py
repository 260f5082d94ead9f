"""Races on real databases (SQLite and PostgreSQL): N processors and sweeps over the same due returns, in threads and
in separate processes, and concurrent requests for the same units (R11). Whatever interleaves, every return is
refunded exactly once, no payment is refunded beyond its capture, nobody gets a unit twice, and the invariants hold.

The returns are built to make races bite: twelve one-return orders, and four orders with two returns each whose
refunds share two payments (R10), so two returns of one order compete for the same payment's room.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from conftest import make_pipeline
from invariants import check_invariants
from sqlalchemy import func, select

from adapters.db import unit_of_work
from models.errors import InvalidInput, StaleState
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, parse
from models.tables import GatewaySettlement, Payment, Refund, RefundAllocation, Return, Transition
from service.returns import Actor
from service.steps import Pipeline
from tests.helpers import NOW, process, receive, sweep, tally

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "race_driver.py"
RECEIVED_AT = NOW + timedelta(days=3)
PROCESS_AT = RECEIVED_AT + timedelta(hours=1)
LEASE = timedelta(minutes=15)  # DEFAULT_POLICY.processing_lease_minutes
SWEEP_AS_OF = PROCESS_AT + LEASE + timedelta(minutes=1)  # past the lease of any claim the processors make
FAR = NOW + timedelta(days=60)
SINGLE, SHARED = 12, 4  # one-return orders; orders with two returns sharing their payments
PROCESSORS, SWEEPERS = 8, 4
RACE_COUNTS = tally("race")


# ---- the data ------------------------------------------------------------------------------------------------------


def race_catalog(orders_with_one_unit: int = 0) -> dict[str, Any]:
    """Customers and orders for the races; times at NOW (P3 applies: 5 days after purchase, unopened, retail)."""
    placed = (NOW - timedelta(days=5)).isoformat()
    later = (NOW - timedelta(days=5) + timedelta(hours=1)).isoformat()
    delivered = (NOW - timedelta(days=2)).isoformat()
    products = [{"sku": "RACE-SERUM", "name": "Race serum", "kind": "skincare", "size": "retail", "price": "50.00"}]
    customers, orders = [], []

    def customer(n: str) -> str:
        customers.append({"account": f"ACC-{n}", "name": f"Customer {n}", "email": f"c{n.lower()}@example.com",
                          "address": {"line1": "1 Main St", "city": "Lantana", "region": "FL", "postal_code": "33462",
                                      "country": "US"}})
        return f"ACC-{n}"

    for i in range(1, SINGLE + 1):
        orders.append({"number": f"R-{i:02}", "account": customer(f"R{i:02}"), "channel": "direct", "placed_at": placed,
                       "delivered_at": delivered,
                       "lines": [{"sku": "RACE-SERUM", "quantity": 1, "unit_price": "50.00", "unit_tax": "4.00",
                                  "expires_on": "2028-12-31"}],
                       "payments": [{"method": "visa", "amount": "54.00", "last4": "4242", "captured_at": placed}]})
    for i in range(1, SHARED + 1):
        # 2 x 54.00 = 108.00 over two payments: each return's 54.00 takes the paypal 48.00 first (most recent, R10)
        orders.append({"number": f"S-{i:02}", "account": customer(f"S{i:02}"), "channel": "direct", "placed_at": placed,
                       "delivered_at": delivered,
                       "lines": [{"sku": "RACE-SERUM", "quantity": 2, "unit_price": "50.00", "unit_tax": "4.00",
                                  "expires_on": "2028-12-31"}],
                       "payments": [{"method": "mastercard", "amount": "60.00", "last4": "5454", "captured_at": placed},
                                    {"method": "paypal", "amount": "48.00", "captured_at": later}]})
    for i in range(1, orders_with_one_unit + 1):
        orders.append({"number": f"U-{i:02}", "account": customer(f"U{i:02}"), "channel": "direct", "placed_at": placed,
                       "delivered_at": delivered,
                       "lines": [{"sku": "RACE-SERUM", "quantity": 1, "unit_price": "50.00", "unit_tax": "4.00",
                                  "expires_on": "2028-12-31"}],
                       "payments": [{"method": "visa", "amount": "54.00", "captured_at": placed}]})
    return {"products": products, "customers": customers, "orders": orders}


def ask(order: str, key: str | None = None) -> ReturnRequestIn:
    account = {"R": "R", "S": "S", "U": "U"}[order[0]] + order[2:]
    return parse(ReturnRequestIn, {"order_number": order, "email": f"c{account.lower()}@example.com",
                                   "reason": "unwanted", "idempotency_key": key,
                                   "lines": [{"sku": "RACE-SERUM", "quantity": 1, "unopened": True}]})


def received_returns(p: Pipeline) -> list[str]:
    """Twenty received returns: requested, labelled and logged at Lantana, none processed yet."""
    p.import_data(parse(ImportIn, race_catalog()))
    orders = [f"R-{i:02}" for i in range(1, SINGLE + 1)] + [f"S-{i:02}" for i in range(1, SHARED + 1)] * 2
    rmas = []
    for n, order in enumerate(orders):
        out = p.request(ask(order, f"race-{n}"), NOW, Actor("api"))
        assert out.state == "authorized", out
        p.render_label(out.rma_number)
        rmas.append(out.rma_number)
    for rma in rmas:
        receipt = parse(ReceiptIn, {"rma": rma, "received_at": RECEIVED_AT.isoformat(), "by": "dock",
                                    "lines": [{"sku": "RACE-SERUM", "unopened": 1}]})
        assert receive(p, receipt, RECEIVED_AT + timedelta(minutes=1)).state == "received"
    assert len(rmas) == SINGLE + 2 * SHARED == 20
    return rmas


# ---- running and judging a race --------------------------------------------------------------------------------


def run_threads(jobs: list[Callable[[], None]]) -> None:
    """Start every job at one barrier so they really overlap; re-raise nothing (jobs record their own outcome)."""
    barrier = threading.Barrier(len(jobs))

    def go(job: Callable[[], None]) -> None:
        barrier.wait()
        job()

    threads = [threading.Thread(target=go, args=(job,), daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
        assert not t.is_alive(), "a racing thread hung (lock wait?)"


def drive_to_rest(p: Pipeline) -> None:
    """A sweep far in the future finishes anything left, then the relay delivers every email."""
    sweep(p, FAR)
    for _ in range(20):
        p.relay(FAR)
        if p.outbox_counts()["pending"] == 0:
            break
    assert p.outbox_counts() == {"pending": 0, "sent": p.outbox_counts()["sent"], "failed": 0}


def assert_each_refunded_once(p: Pipeline, rmas: list[str]) -> None:
    """Every return completed once, one Refund row each, one settlement per gateway key, none beyond capture."""
    with unit_of_work(p.engine) as s:
        rows = {r.rma: r for r in s.scalars(select(Return).where(Return.rma.in_(rmas)))}  # type: ignore[union-attr]
        assert {r.state for r in rows.values()} == {"completed"}, Counter(r.state for r in rows.values())
        ids = [r.id for r in rows.values()]
        completions = Counter(s.scalars(select(Transition.return_id).where(Transition.to_state == "completed")))
        assert all(completions[i] == 1 for i in ids), completions
        refunds = Counter(s.scalars(select(Refund.return_id)))
        assert all(refunds[i] == 1 for i in ids) and len(refunds) == len(ids), refunds
        keys = Counter(s.scalars(select(GatewaySettlement.idempotency_key)))
        assert keys and max(keys.values()) == 1, keys
        # What the gateway paid per payment equals what the books recorded, and never exceeds the capture (R10).
        paid: Counter[int] = Counter()
        for g in s.scalars(select(GatewaySettlement)):
            paid[g.payment_id] += g.amount_cents
        recorded: Counter[int] = Counter()
        for a in s.scalars(select(RefundAllocation)):
            recorded[a.payment_id] += a.amount_cents
        for pay in s.scalars(select(Payment)):
            assert paid[pay.id or 0] == recorded[pay.id or 0] == pay.refunded_cents <= pay.amount_cents, pay
        total = s.scalar(select(func.sum(Refund.amount_cents)))
        assert total == 20 * 5400


def judge(p: Pipeline, rmas: list[str], errors: list[str]) -> None:
    assert not errors, errors
    RACE_COUNTS["invariant checks"] += check_invariants(p)
    drive_to_rest(p)
    assert_each_refunded_once(p, rmas)
    RACE_COUNTS["invariant checks"] += check_invariants(p, settled=True, mail_dir=p.settings.mail_dir)


# ---- (a) threads ---------------------------------------------------------------------------------------------------


def test_threads_process_and_sweep_the_same_returns(tmp_path: Path, db_url: str) -> None:
    """8 processor threads and 4 sweep threads (as_of past the lease) over the same 20 received returns."""
    p = make_pipeline(tmp_path / "home", db_url)
    rmas = received_returns(p)
    errors: list[str] = []
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def processor(i: int) -> Callable[[], None]:
        def job() -> None:
            order = list(rmas)
            random.Random(i).shuffle(order)
            for rma in order:
                try:
                    done = process(p, rma, PROCESS_AT, Actor(f"worker-{i}"))
                    with lock:
                        outcomes["completed" if done else "not ours"] += 1
                except StaleState:
                    with lock:
                        outcomes["lost a compare-and-set"] += 1
                except Exception as exc:  # noqa: BLE001 - any other error is a finding
                    errors.append(f"worker-{i} {rma}: {type(exc).__name__}: {exc}")
        return job

    def sweeper(i: int) -> Callable[[], None]:
        def job() -> None:
            try:
                done = sweep(p, SWEEP_AS_OF)
                with lock:
                    outcomes["completed"] += len(done.processed)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"sweep-{i}: {type(exc).__name__}: {exc}")
        return job

    run_threads([processor(i) for i in range(PROCESSORS)] + [sweeper(i) for i in range(SWEEPERS)])
    RACE_COUNTS["concurrent workers (threads)"] += PROCESSORS + SWEEPERS
    RACE_COUNTS["process calls raced"] += PROCESSORS * len(rmas)
    assert outcomes["completed"] <= len(rmas), outcomes  # nobody reports a completion twice
    judge(p, rmas, errors)


# ---- (b) processes -------------------------------------------------------------------------------------------------


def spawn(tmp_path: Path, p: Pipeline, mode: str, name: str, at: datetime, **extra: str) -> subprocess.Popen[str]:
    args = [sys.executable, str(DRIVER), mode, "--url", p.settings.database_url, "--home", str(p.settings.home),
            "--go", str(tmp_path / "go"), "--at", at.isoformat(), "--name", name]
    for k, v in extra.items():
        args += [f"--{k}", v]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def race_processes(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    """Wait until every process is ready, open the gate at once, collect each one's JSON report."""
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
    (tmp_path / "go").touch()
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0 and "Traceback" not in err, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def test_processes_process_and_sweep_the_same_returns(tmp_path: Path, db_url: str) -> None:
    """The same race across separate OS processes, each with its own engine and connections."""
    p = make_pipeline(tmp_path / "home", db_url)
    rmas = received_returns(p)
    workers, sweepers = 6, 2  # 8 interpreters on 2 cores: enough to overlap, cheap enough to start
    procs = [spawn(tmp_path, p, "process", f"proc-worker-{i}", PROCESS_AT, rmas=",".join(rmas), seed=str(i))
             for i in range(workers)]
    procs += [spawn(tmp_path, p, "sweep", f"proc-sweep-{i}", SWEEP_AS_OF) for i in range(sweepers)]
    reports = race_processes(tmp_path, procs)
    RACE_COUNTS["concurrent workers (processes)"] += len(procs)
    RACE_COUNTS["process calls raced"] += workers * len(rmas)
    completed = [r for rep in reports for r in rep["completed"]] + \
        [r for rep in reports for r in rep.get("sweep", {}).get("processed", [])]
    assert len(completed) == len(set(completed)), Counter(completed).most_common(3)
    judge(p, rmas, [e for rep in reports for e in rep["errors"]])


# ---- (c) two requests for the same units (R11) ---------------------------------------------------------------------


def test_concurrent_requests_for_the_last_unit_one_wins(tmp_path: Path, db_url: str) -> None:
    """Ten orders with one unit each; four threads ask for that unit at once (distinct keys): exactly one wins,
    the others hear R11, and nobody holds a unit twice."""
    p = make_pipeline(tmp_path / "home", db_url)
    p.import_data(parse(ImportIn, race_catalog(orders_with_one_unit=10)))
    contenders = 4
    for i in range(1, 11):
        order = f"U-{i:02}"
        wins: list[dict[str, Any]] = []
        refusals: list[str] = []
        errors: list[str] = []

        def contender(k: int, order: str = order, wins: list[dict[str, Any]] = wins, refusals: list[str] = refusals,
                      errors: list[str] = errors) -> Callable[[], None]:
            def job() -> None:
                try:
                    wins.append(p.request(ask(order, f"tab-{k}"), NOW, Actor("api")))
                except InvalidInput as exc:
                    refusals.append(str(exc))
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"{type(exc).__name__}: {exc}")
            return job

        run_threads([contender(k) for k in range(contenders)])
        RACE_COUNTS["concurrent requests for one unit"] += contenders
        assert not errors, errors
        assert len(wins) == 1 and wins[0].state == "authorized", (wins, refusals)
        assert len(refusals) == contenders - 1
        assert all("(R11)" in r and "0 left" in r for r in refusals), refusals
        RACE_COUNTS["invariant checks"] += check_invariants(p)
    with unit_of_work(p.engine) as s:
        assert s.scalar(select(func.count()).select_from(Return)) == 10


def test_concurrent_retries_with_one_idempotency_key_make_one_return(tmp_path: Path, db_url: str) -> None:
    """A storefront retrying one HTTP call from several threads at once: one return, the others replay it."""
    p = make_pipeline(tmp_path / "home", db_url)
    p.import_data(parse(ImportIn, race_catalog(orders_with_one_unit=5)))
    for i in range(1, 6):
        order, outs, errors = f"U-{i:02}", [], []

        def retry(order: str = order, outs: list[dict[str, Any]] = outs, errors: list[str] = errors) -> None:
            try:
                outs.append(p.request(ask(order, "storefront-retry-1"), NOW, Actor("api")))
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{type(exc).__name__}: {exc}")

        run_threads([retry] * 4)
        RACE_COUNTS["concurrent retries of one key"] += 4
        assert not errors, errors
        assert len({o.return_id for o in outs}) == 1 and sorted(o.replayed for o in outs) == [False] + [True] * 3
        RACE_COUNTS["invariant checks"] += check_invariants(p)


def test_processes_request_the_last_unit_one_wins(tmp_path: Path, db_url: str) -> None:
    """The R11 race across processes: four interpreters ask for the single unit of one order at the same moment."""
    p = make_pipeline(tmp_path / "home", db_url)
    p.import_data(parse(ImportIn, race_catalog(orders_with_one_unit=1)))
    procs = [spawn(tmp_path, p, "request", f"proc-request-{k}", NOW,
                   request=ask("U-01", f"tab-{k}").model_dump_json()) for k in range(4)]
    reports = race_processes(tmp_path, procs)
    RACE_COUNTS["concurrent requests for one unit"] += len(procs)
    assert not [e for rep in reports for e in rep["errors"]]
    wins = [rep["result"] for rep in reports if "result" in rep]
    refusals = [rep["refused"] for rep in reports if "refused" in rep]
    assert len(wins) == 1 and wins[0]["state"] == "authorized", reports
    assert len(refusals) == 3 and all(r.startswith("InvalidInput") and "(R11)" in r for r in refusals), refusals
    RACE_COUNTS["invariant checks"] += check_invariants(p)
