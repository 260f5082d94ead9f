"""The whole pipeline as a Hypothesis state machine (SQLite, a fresh database per example): requests (with repeated
idempotency keys), duplicate triggers, receipts with random per-unit conditions, processing, sweeps on an advancing
clock, the relay, operator reviews and cancels, a worker that dies after paying, and a gateway that times out after
paying. Five orders were captured at Stripe (the loopback fake of its documented behaviour): its refunds may come
back pending, failed or declined, pending ones settle later, it forgets idempotency keys, a worker dies after its
yes, and its answer gets lost. After every step the invariants hold (tests/invariants.py, against Stripe's own
record too); at the end everything is driven to rest and the settled invariants hold: nothing lost, nothing paid
twice, no payment refunded beyond its capture whatever Stripe said.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import ExitStack
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlalchemy import func, select

from adapters.config import load_settings
from adapters.db import make_engine, unit_of_work, upgrade
from adapters.payments.providers import Providers
from models.errors import InvalidInput, StaleState, TransientError
from models.money import to_cents
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, parse
from models.states import State
from models.tables import Payment, ProviderRefund, Return, Transition
from service import refunds, stages
from service.returns import Actor
from service.steps import Pipeline
from tests.fake_providers import FakeStripe, serve
from tests.helpers import NOW, at, cancel, catalog_at_stripe, process, receive, sweep, tally
from tests.invariants import GONE, check_invariants, seen_at_stripe

SAMPLE = Path(__file__).resolve().parent.parent / "sample"
SAMPLES: list[dict[str, Any]] = [s["request"] for s in json.loads((SAMPLE / "requests.json").read_text("utf-8"))]
REST = timedelta(days=120)  # far enough for every RMA to expire and every lease to lapse

# Derandomized and bounded for CI (~60 s on 2 cores); applied to this machine only, so other suites keep theirs.
settings.register_profile("ci", derandomize=True, database=None, max_examples=60, stateful_step_count=40,
                          deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
CI = settings.get_profile("ci")
COUNTS = tally("stateful")

_TEMPLATE: dict[str, Path] = {}
CATALOG: dict[str, Any] = json.loads((SAMPLE / "catalog.json").read_text("utf-8"))
# Orders captured at Stripe (IS-1002 split over two cards); the others stay on the ledger. The fake numbers its
# payment intents in the order they are added, so every example's fake holds the same ids the template recorded.
AT_STRIPE = ("IS-1001", "IS-1002", "IS-1007", "IS-1008", "IS-1011")
STRIPE_CAPTURES = [(o["number"], to_cents(Decimal(pay["amount"])))
                   for o in CATALOG["orders"] if o["number"] in AT_STRIPE for pay in o["payments"]]
INTENTS: dict[str, list[str]] = {}
for _n, (_order, _) in enumerate(STRIPE_CAPTURES, start=1):
    INTENTS.setdefault(_order, []).append(f"pi_fake{_n}")
MOODS = ("succeeded", "pending", "failed", "declined")  # what Stripe does with the next refund of a charge


def template_db() -> Path:
    """A migrated SQLite database holding the sample catalogue, made once and copied per example."""
    if "path" not in _TEMPLATE:
        folder = Path(tempfile.mkdtemp(prefix="returns-stateful-template-"))
        url = f"sqlite:///{folder / 'returns.db'}"
        upgrade(url)
        engine = make_engine(url)
        p = Pipeline(settings=load_settings({"RETURNS_HOME": str(folder), "RETURNS_DATABASE_URL": url}), engine=engine)
        p.import_data(parse(ImportIn, catalog_at_stripe(CATALOG, INTENTS)))
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


class Died(BaseException):
    """The worker's process is gone (a BaseException, so no `except Exception` on the way up handles it)."""


class PipelineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="returns-stateful-"))
        home = self.dir / "home"
        home.mkdir()
        shutil.copy(template_db(), self.dir / "returns.db")
        url = f"sqlite:///{self.dir / 'returns.db'}"
        self.engine = make_engine(url)
        self.stack = ExitStack()
        self.stripe = FakeStripe()
        self.charges = [self.stripe.add_payment(cents) for _, cents in STRIPE_CAPTURES]
        assert [c.intent for c in self.charges] == [i for _, ids in INTENTS.items() for i in ids]
        stripe_url = self.stack.enter_context(serve(self.stripe))
        providers = Providers(self.engine, env={"RETURNS_STRIPE_API_KEY": self.stripe.api_key,
                                                "RETURNS_STRIPE_API_BASE": stripe_url},
                              secrets=lambda name: None, timeout=5.0)
        self.p = Pipeline(settings=load_settings({"RETURNS_HOME": str(home), "RETURNS_DATABASE_URL": url}),
                          engine=self.engine, providers=providers)
        self.gateway = TimeoutAfterPaying(self.p.gateway)
        self.p.gateway = self.gateway
        # A worker that dies right after Stripe's yes, before our record: the crash point raises instead of SIGKILL.
        self.die_at_provider = False
        real_point = refunds.crash_point

        def crash_point(name: str) -> None:
            if name == "provider.after-refund" and self.die_at_provider:
                self.die_at_provider = False
                raise Died(name)
            real_point(name)

        refunds.crash_point = crash_point  # type: ignore[assignment]
        self.stack.callback(setattr, refunds, "crash_point", real_point)
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

    def on_ledger(self, rma: str) -> bool:
        """Whether every payment of the return's order is on the ledger (the wrapper gateway's timeouts apply)."""
        with unit_of_work(self.engine) as s:
            order = s.scalars(select(Return.order_number).where(Return.rma == rma)).one()
            return all(pay.provider == "ledger" for pay in s.scalars(select(Payment).where(
                Payment.order_number == order)))

    def at_stripe(self, *states: State) -> list[str]:
        return [r for r in self.rmas_in(*states) if not self.on_ledger(r)]

    def stripe_ready(self) -> list[str]:
        """Returns at Stripe a worker would pay now: received, or processing with a lapsed lease."""
        lapsed = set(self.p.sweep_plan(self.now).redrive)
        return [r for r in self.at_stripe(State.RECEIVED, State.PROCESSING)
                if r in lapsed or r in self.rmas_in(State.RECEIVED)]

    def charges_of(self, rma: str) -> list[int]:
        """The fake's charges (by index) that captured the return's order."""
        with unit_of_work(self.engine) as s:
            order = s.scalars(select(Return.order_number).where(Return.rma == rma)).one()
        return [i for i, (number, _) in enumerate(STRIPE_CAPTURES) if number == order]

    def stripe_record(self) -> Any:
        with self.stripe.lock:
            return seen_at_stripe([dict(r) for r in self.stripe.refunds.values()])

    def pending_at_stripe(self) -> list[str]:
        with self.stripe.lock:
            return sorted(k for k, r in self.stripe.refunds.items() if r["status"] == "pending")

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
        shown = self.p.show(rma, self.now)
        lines = []
        for ln in shown["lines"]:
            if ln["decision"] == "declined":
                continue
            q = ln["quantity"]
            unopened = data.draw(st.integers(0, q))
            opened = data.draw(st.integers(0, q - unopened))
            damaged = data.draw(st.integers(0, q - unopened - opened))
            lines.append({"sku": ln["sku"], "unopened": unopened, "opened": opened, "damaged": damaged,
                          "missing": q - unopened - opened - damaged})
        receipt = parse(ReceiptIn, {"rma": rma, "received_at": self.now.isoformat(), "lines": lines, "by": "dock"})
        if self.now >= datetime.fromisoformat(shown["rma_valid_until"]):  # lapsed, not swept yet: R8 refuses it
            before = self.n_returns(), self.p.show(rma, self.now)["timeline"]
            try:
                receive(self.p, receipt, self.now)
            except InvalidInput as exc:
                assert "expired" in str(exc)
                assert (self.n_returns(), self.p.show(rma, self.now)["timeline"]) == before
                return
            raise AssertionError(f"a parcel after {rma}'s validity was recorded")
        out = receive(self.p, receipt, self.now)
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
    @rule(data=st.data(), authorize=st.booleans(), card_updated=st.booleans())
    def review(self, data: st.DataObject, authorize: bool, card_updated: bool) -> None:
        self.step("review")
        rmas = self.rmas_in(State.REVIEW)
        if not rmas:
            return
        rma = data.draw(st.sampled_from(rmas))
        parked = self.parked_by_provider(rma)
        if parked and card_updated:  # the customer fixed the card before the operator looked: Stripe will pay
            for i in self.charges_of(rma):
                self.stripe_mood(i, "succeeded")
        try:
            out = stages.after_review(at(self.p, self.now), rma, authorize, "checked", Actor.operator("alice"))
        except StaleState:
            COUNTS["compare-and-set lost"] += 1
            return
        except InvalidInput as exc:
            # parked after a partial payout: the money is out, so only an authorize can settle it
            assert not authorize and "already refunded" in str(exc), exc
            assert self.rmas_in(State.REVIEW).count(rma) == 1
            COUNTS["declines refused after a partial payout"] += 1
            return
        if parked and authorize:
            COUNTS[f"operator authorized a parked refund -> {out.state}"] += 1

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
        rmas = [r for r in self.rmas_in(State.RECEIVED) if self.on_ledger(r)]
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

    # ---- Stripe ----------------------------------------------------------------------------------------------------

    @initialize(orders=st.lists(st.sampled_from(AT_STRIPE), min_size=1, max_size=3, unique=True),
                moods=st.lists(st.sampled_from(MOODS), min_size=len(STRIPE_CAPTURES), max_size=len(STRIPE_CAPTURES)))
    def stripe_orders_returned(self, orders: list[str], moods: list[str]) -> None:
        """Every example starts with returns on orders captured at Stripe, each charge in a mood of its own, so the
        steps spend themselves on refunds that may be pending, failed or declined."""
        for i, mood in enumerate(moods):
            self.stripe_mood(i, mood)
        for order in orders:
            self.request(next(s for s in SAMPLES if s["order_number"] == order), f"stripe-{order}", False)

    @rule(charge=st.integers(0, len(STRIPE_CAPTURES) - 1), mood=st.sampled_from(MOODS))
    def stripe_mood(self, charge: int, mood: str) -> None:
        """What Stripe does with the next refunds of one charge: succeed, stay pending, fail, or decline (402)."""
        self.step("stripe mood")
        ch = self.charges[charge]
        ch.refuse = (402, "card_error", "card_declined") if mood == "declined" else None
        ch.refund_status = "succeeded" if mood == "declined" else mood

    @precondition(lambda self: bool(self.pending_at_stripe()))
    @rule(data=st.data(), outcome=st.sampled_from(["succeeded", "succeeded", "failed", "canceled"]))
    def stripe_settles(self, data: st.DataObject, outcome: str) -> None:
        """A pending refund settles at Stripe, days later: the bank's answer."""
        self.step("stripe settles")
        pending = self.pending_at_stripe()
        if pending:
            self.stripe.settle(data.draw(st.sampled_from(pending)), outcome,
                               None if outcome == "succeeded" else "expired_or_canceled_card")
            COUNTS[f"stripe settled a pending refund {outcome}"] += 1

    @precondition(lambda self: bool(self.stripe.saved))
    @rule()
    def stripe_forgets_keys(self) -> None:
        """More than 24 hours passed at Stripe: every idempotency key is pruned; only the lookup stands."""
        self.step("stripe prunes keys")
        self.stripe.prune_keys()

    @precondition(lambda self: bool(self.stripe_ready()))
    @rule(data=st.data())
    def worker_dies_after_stripe_said_yes(self, data: st.DataObject) -> None:
        """Stripe made the refund (or declined it) and the worker died before recording its answer."""
        self.step("crash after stripe")
        rmas = self.stripe_ready()
        if not rmas:
            return
        self.die_at_provider = True
        try:
            process(self.p, data.draw(st.sampled_from(rmas)), self.now, Actor("doomed"))
        except Died:
            COUNTS["crashes after stripe answered"] += 1
        except StaleState:
            COUNTS["compare-and-set lost"] += 1
        finally:
            self.die_at_provider = False

    @precondition(lambda self: bool(self.stripe_ready()))
    @rule(data=st.data())
    def stripe_answer_lost(self, data: st.DataObject) -> None:
        """Stripe makes the refund and the connection drops, three times (the SDK's retries too): unknown outcome."""
        self.step("stripe answer lost")
        rmas = self.stripe_ready()
        if not rmas:
            return
        self.stripe.faults.extend(["drop"] * 3)
        try:
            process(self.p, data.draw(st.sampled_from(rmas)), self.now, Actor("worker"))
        except TransientError:
            COUNTS["stripe answers lost"] += 1
        except StaleState:
            COUNTS["compare-and-set lost"] += 1
        finally:
            self.stripe.faults.clear()

    def parked_by_provider(self, rma: str) -> bool:
        """Whether the return's latest attempt at a provider failed (it waits in review for a person)."""
        with unit_of_work(self.engine) as s:
            rid = s.scalars(select(Return.id).where(Return.rma == rma)).one()
            last = s.scalars(select(ProviderRefund.status).where(ProviderRefund.return_id == rid)
                             .order_by(ProviderRefund.id.desc())).first()  # type: ignore[union-attr]
        return last in GONE

    # ---- invariants ------------------------------------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        COUNTS["invariant checks"] += check_invariants(self.p, mail_dir=self.p.settings.mail_dir,
                                                       at_provider=self.stripe_record())
        COUNTS["invariant passes"] += 1

    @invariant()
    def parked_refunds_are_on_the_board_with_the_reason(self) -> None:
        """A refund Stripe failed or declined: the return is in review, counted on the board, the reason recorded."""
        in_review = self.rmas_in(State.REVIEW)
        assert self.p.board(self.now).counts.get("review", 0) == len(in_review)
        parked = [rma for rma in in_review if self.parked_by_provider(rma)]
        with unit_of_work(self.engine) as s:
            for rma in parked:
                ret = s.scalars(select(Return).where(Return.rma == rma)).one()
                last = s.scalars(select(Transition).where(Transition.return_id == ret.id)
                                 .order_by(Transition.id.desc())).first()  # type: ignore[union-attr]
                assert last is not None and last.to_state == State.REVIEW and "stripe" in str(last.facts.get("error"))
                COUNTS["parked refunds seen on the board"] += 1

    def teardown(self) -> None:
        try:
            self.drive_to_rest()
        finally:
            self.stack.close()
            self.engine.dispose()
            shutil.rmtree(self.dir, ignore_errors=True)

    def drive_to_rest(self) -> None:
        rest = self.now + REST
        for _ in range(10):  # one return per order is processed at a time: a later pass takes the next
            # The bank answers every pending refund, at last, including those this loop's last sweep asked for;
            # the next sweep comes after their lease, as the hourly one would.
            for ref in self.pending_at_stripe():
                self.stripe.settle(ref, "succeeded")
            done = sweep(self.p, rest)
            if not done.processed and not self.p.sweep_plan(rest).redrive and not self.pending_at_stripe() \
                    and not self.rmas_in(State.PROCESSING, State.RECEIVED):
                break
            rest += timedelta(hours=1)
        for _ in range(30):
            self.p.relay(rest)
            if self.p.outbox_counts()["pending"] == 0:
                break
        COUNTS["invariant checks"] += check_invariants(self.p, settled=True, mail_dir=self.p.settings.mail_dir,
                                                       at_provider=self.stripe_record())
        COUNTS["settled checks"] += 1
        with self.stripe.lock:
            COUNTS["stripe refunds made"] += len(self.stripe.refunds)
        with unit_of_work(self.engine) as s:
            for status in s.scalars(select(ProviderRefund.status)):
                COUNTS[f"stripe attempts ended {status}"] += 1
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
