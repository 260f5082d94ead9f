"""The whole pipeline as a Hypothesis state machine (SQLite, a fresh database per example): requests (with repeated
idempotency keys), duplicate triggers, receipts with random per-unit conditions, processing, sweeps on an advancing
clock, the relay, operator reviews and cancels, a worker that dies after paying, and a gateway that times out after
paying. After every step the invariants hold (tests/invariants.py); at the end everything is driven to rest and the
settled invariants hold too: nothing lost, nothing paid twice.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from invariants import check_invariants
from sqlalchemy import func, select

from adapters.config import load_settings
from adapters.db import make_engine, unit_of_work, upgrade
from models.errors import InvalidInput, StaleState, TransientError
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, parse
from models.states import State
from models.tables import Return
from service.returns import Actor
from service.steps import Pipeline
from tests.helpers import NOW, cancel, finish, process, receive, review, sweep, tally

SAMPLE = Path(__file__).resolve().parent.parent / "sample"
SAMPLES: list[dict[str, Any]] = [s["request"] for s in json.loads((SAMPLE / "requests.json").read_text("utf-8"))]
REST = timedelta(days=120)  # far enough for every RMA to expire and every lease to lapse

# Derandomized and bounded for CI (~60 s on 2 cores); applied to this machine only, so other suites keep theirs.
settings.register_profile("ci", derandomize=True, database=None, max_examples=60, stateful_step_count=40,
                          deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
CI = settings.get_profile("ci")
COUNTS = tally("stateful")

_TEMPLATE: dict[str, Path] = {}


def template_db() -> Path:
    """A migrated SQLite database holding the sample catalogue, made once and copied per example."""
    if "path" not in _TEMPLATE:
        folder = Path(tempfile.mkdtemp(prefix="returns-stateful-template-"))
        url = f"sqlite:///{folder / 'returns.db'}"
        upgrade(url)
        engine = make_engine(url)
        p = Pipeline(settings=load_settings({"RETURNS_HOME": str(folder), "RETURNS_DATABASE_URL": url}), engine=engine)
        p.import_data(parse(ImportIn, (SAMPLE / "catalog.json").read_text("utf-8")))
        engine.dispose()
        from adapters.db import engine_for

        engine_for(url).dispose()  # upgrade() used the cached engine: close it so the WAL is checkpointed
        _TEMPLATE["path"] = folder / "returns.db"
    return _TEMPLATE["path"]


class TimeoutAfterPaying:
    """A gateway that pays, then (when armed) loses the answer: the caller sees a timeout, the money has moved."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = False

    def refund(self, *, key: str, payment_id: int, amount_cents: int) -> str:
        reference = self.inner.refund(key=key, payment_id=payment_id, amount_cents=amount_cents)
        if self.armed:
            self.armed = False
            raise TransientError("gateway timed out (after settling)")
        return reference


class PipelineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="returns-stateful-"))
        home = self.dir / "home"
        home.mkdir()
        shutil.copy(template_db(), self.dir / "returns.db")
        url = f"sqlite:///{self.dir / 'returns.db'}"
        self.engine = make_engine(url)
        self.p = Pipeline(settings=load_settings({"RETURNS_HOME": str(home), "RETURNS_DATABASE_URL": url}),
                          engine=self.engine)
        self.gateway = TimeoutAfterPaying(self.p.gateway)
        self.p.gateway = self.gateway
        self.now = NOW
        self.keys: dict[tuple[str, str], int] = {}  # (order, idempotency key) -> return id
        self.sent: list[tuple[ReturnRequestIn, int]] = []  # requests stored, for duplicate triggers
        COUNTS["examples"] += 1

    # ---- helpers ---------------------------------------------------------------------------------------------------

    def rmas_in(self, *states: State) -> list[str]:
        with unit_of_work(self.engine) as s:
            return [r for r in s.scalars(select(Return.rma).where(Return.state.in_([str(x) for x in states]))  # type: ignore[attr-defined]
                                         .order_by(Return.id)) if r]

    def n_returns(self) -> int:
        with unit_of_work(self.engine) as s:
            return int(s.scalar(select(func.count()).select_from(Return)) or 0)

    def label(self, out: dict[str, Any]) -> None:
        if out.state == "authorized":
            self.p.render_label(out.rma_number)

    def step(self, name: str) -> None:
        COUNTS["steps"] += 1
        COUNTS[f"rule {name}"] += 1

    # ---- rules -----------------------------------------------------------------------------------------------------

    @rule(sample=st.sampled_from(SAMPLES), key=st.sampled_from([None, "k1", "k2", "k3"]), one_unit=st.booleans())
    def request(self, sample: dict[str, Any], key: str | None, one_unit: bool) -> None:
        self.step("request")
        body = dict(sample) | {"idempotency_key": key}
        if one_unit:
            body["lines"] = [ln | {"quantity": 1} for ln in sample["lines"]]
        req = parse(ReturnRequestIn, body)
        before = self.n_returns()
        try:
            out = self.p.request(req, self.now, Actor("api"))
        except InvalidInput as exc:
            assert "(R11)" in str(exc), exc  # the only refusal a sample request can earn: its units are taken
            assert self.n_returns() == before
            COUNTS["requests refused (R11)"] += 1
            return
        if key is not None and (req.order_number, key) in self.keys:
            assert out.replayed and out.return_id == self.keys[(req.order_number, key)]
            assert self.n_returns() == before
            COUNTS["idempotency keys replayed"] += 1
            return
        assert not out.replayed and self.n_returns() == before + 1
        if key is not None:
            self.keys[(req.order_number, key)] = out.return_id
            self.sent.append((req, out.return_id))
        self.label(out)

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def duplicate_trigger(self, data: st.DataObject) -> None:
        """The storefront sends the very same request again (a retried HTTP call): same return, nothing new."""
        self.step("duplicate")
        req, return_id = data.draw(st.sampled_from(self.sent))
        before = self.n_returns()
        out = self.p.request(req, self.now, Actor("api"))
        assert out.replayed and out.return_id == return_id and self.n_returns() == before

    @precondition(lambda self: bool(self.rmas_in(State.AUTHORIZED)))
    @rule(data=st.data())
    def receive(self, data: st.DataObject) -> None:
        self.step("receive")
        rmas = self.rmas_in(State.AUTHORIZED)
        if not rmas:
            return
        rma = data.draw(st.sampled_from(rmas))
        lines = []
        for ln in self.p.show(rma, self.now)["lines"]:
            if ln["decision"] == "declined":
                continue
            q = ln["quantity"]
            unopened = data.draw(st.integers(0, q))
            opened = data.draw(st.integers(0, q - unopened))
            damaged = data.draw(st.integers(0, q - unopened - opened))
            lines.append({"sku": ln["sku"], "unopened": unopened, "opened": opened, "damaged": damaged,
                          "missing": q - unopened - opened - damaged})
        out = receive(self.p, parse(ReceiptIn, {"rma": rma, "received_at": self.now.isoformat(), "lines": lines,
                                               "by": "dock"}), self.now)
        assert out.state in ("received", "review")

    @precondition(lambda self: bool(self.rmas_in(State.RECEIVED, State.PROCESSING)))
    @rule(data=st.data())
    def process(self, data: st.DataObject) -> None:
        self.step("process")
        rmas = self.rmas_in(State.RECEIVED, State.PROCESSING)
        if not rmas:
            return
        try:
            process(self.p, data.draw(st.sampled_from(rmas)), self.now, Actor("worker"))
        except StaleState:
            COUNTS["compare-and-set lost"] += 1

    # mostly short steps (leases lapse after 15 min); now and then past R9's due-soon mark or R8's 30 days
    @rule(hours=st.sampled_from([1, 1, 6, 24, 24 * 9, 24 * 11, 24 * 31]))
    def sweep(self, hours: int) -> None:
        self.step("sweep")
        self.now += timedelta(hours=hours)
        sweep(self.p, self.now)

    @rule()
    def relay(self) -> None:
        self.step("relay")
        self.p.relay(self.now)

    @precondition(lambda self: bool(self.rmas_in(State.REVIEW)))
    @rule(data=st.data(), authorize=st.booleans())
    def review(self, data: st.DataObject, authorize: bool) -> None:
        self.step("review")
        rmas = self.rmas_in(State.REVIEW)
        if not rmas:
            return
        rma = data.draw(st.sampled_from(rmas))
        try:
            out = review(self.p, rma, authorize, "checked", "alice", self.now)
        except StaleState:
            COUNTS["compare-and-set lost"] += 1
            return
        self.label(out)
        if out.state == "processing":
            finish(self.p, rma, self.now, Actor("operator:alice"))

    @precondition(lambda self: bool(self.rmas_in(State.AUTHORIZED)))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.step("cancel")
        rmas = self.rmas_in(State.AUTHORIZED)
        if rmas:
            assert cancel(self.p, data.draw(st.sampled_from(rmas)), "customer withdrew", "alice", self.now).state \
                == "cancelled"

    @precondition(lambda self: bool(self.rmas_in(State.RECEIVED)))
    @rule(data=st.data())
    def worker_dies_after_paying(self, data: st.DataObject) -> None:
        """claim + pay, then nothing: the money moved, the books do not know yet; the sweep must finish it."""
        self.step("crash after pay")
        rmas = self.rmas_in(State.RECEIVED)
        if not rmas:
            return
        rma = data.draw(st.sampled_from(rmas))
        if self.p.claim(rma, self.now, Actor("doomed")):
            self.p.pay(self.p.plan_refund(rma))
            COUNTS["crashes after paying"] += 1

    @precondition(lambda self: bool(self.rmas_in(State.RECEIVED)))
    @rule(data=st.data())
    def gateway_times_out_after_paying(self, data: st.DataObject) -> None:
        self.step("gateway timeout")
        rmas = self.rmas_in(State.RECEIVED)
        if not rmas:
            return
        rma = data.draw(st.sampled_from(rmas))
        self.gateway.armed = True
        try:
            out = process(self.p, rma, self.now, Actor("worker"))
            # A zero refund (replacement, nothing refundable) calls no gateway; otherwise the timeout surfaces.
            assert out is None or str(out.refund_total) == "0.00", out
        except TransientError:
            COUNTS["gateway timeouts after paying"] += 1
        finally:
            self.gateway.armed = False

    # ---- invariants ------------------------------------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        COUNTS["invariant checks"] += check_invariants(self.p, mail_dir=self.p.settings.mail_dir)
        COUNTS["invariant passes"] += 1

    def teardown(self) -> None:
        try:
            self.drive_to_rest()
        finally:
            self.engine.dispose()
            shutil.rmtree(self.dir, ignore_errors=True)

    def drive_to_rest(self) -> None:
        rest = self.now + REST
        for _ in range(10):  # one return per order is processed at a time: a later pass takes the next
            done = sweep(self.p, rest)
            if not done.processed and not self.p.sweep_plan(rest).redrive:
                break
        for _ in range(30):
            self.p.relay(rest)
            if self.p.outbox_counts()["pending"] == 0:
                break
        COUNTS["invariant checks"] += check_invariants(self.p, settled=True, mail_dir=self.p.settings.mail_dir)
        COUNTS["settled checks"] += 1
        with unit_of_work(self.engine) as s:
            for state, n in s.execute(select(Return.state, func.count()).group_by(Return.state)):
                COUNTS[f"ended {state}"] += n


TestPipelineMachine = PipelineMachine.TestCase
TestPipelineMachine.settings = CI


def test_zz_report_counts() -> None:
    """What the machine tried (run with -s); the numbers go into docs/reliability-race-hostile.md."""
    print("\nstateful counts:", dict(sorted(COUNTS.items())))
    if COUNTS["examples"]:
        assert COUNTS["settled checks"] >= COUNTS["examples"] - 1 and COUNTS["invariant passes"] > COUNTS["examples"]
