"""Both worker types serve prefect.yaml unchanged; `--limit` holds; SIGTERM and cancelling let runs end cleanly."""

# The mail server holds each message until the test opens it, so a flow run stays Running as long as a test needs.

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from served import Shop, open_shop, prefect_with_deployments
from smtp_server import Inbox, SmtpServer

from adapters.label.layout import label_path
from entrypoints.prefect_server import IN_PROCESS

pytestmark = [pytest.mark.slow, pytest.mark.prefect]


class Gate(Inbox):
    """An inbox that holds every message at DATA until `opened` is set (its flow run stays Running meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = threading.Event()
        self.held = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.held += 1
        while not self.opened.is_set():
            await asyncio.sleep(0.05)
        return await super().handle_DATA(server, session, envelope)

    def wait_held(self, count: int, shop: Shop, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while self.held < count:
            assert shop.worker.poll() is None, shop.log.read_text("utf-8", "replace")[-3000:]
            assert time.monotonic() < deadline, f"{self.held} of {count} messages reached the mail server"
            time.sleep(0.05)


@pytest.fixture
def gate() -> Iterator[tuple[Gate, str]]:
    handler = Gate()
    smtp = SmtpServer(handler, url_query="?timeout=300")  # the client waits as long as the gate holds
    smtp.start()
    try:
        yield handler, smtp.url
    finally:
        handler.opened.set()
        smtp.stop()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with prefect_with_deployments(tmp_path_factory.mktemp("in-process")) as env:
        yield env


@pytest.fixture(scope="module")
def process_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with prefect_with_deployments(tmp_path_factory.mktemp("process"), pool_type="process") as env:
        yield env


def assert_authorized_with_label(shop: Shop, order: str, run: dict[str, Any]) -> None:
    assert run["state"]["type"] == "COMPLETED", run["state"]
    (ret,) = shop.returns_of(order)
    assert ret.state == "authorized"
    assert ret.rma is not None
    assert label_path(shop.pipeline.settings.label_dir, ret.rma).read_bytes().startswith(b"%PDF")


def claimed_to_final(shop: Shop, run_id: str) -> tuple[str, str]:
    """From the run's first Pending (the worker's claim) to its final state, as the server recorded them."""
    history = shop.states(run_id)
    claimed = next(s["timestamp"] for s in history if s["type"] == "PENDING")
    final = next(s["timestamp"] for s in history if s["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"))
    return claimed, final


def most_at_once(intervals: list[tuple[str, str]]) -> int:
    """The largest number of intervals open at one instant (an interval closes before one opening at its end)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                   key=lambda edge: (datetime_of(edge[0]), edge[1]))
    most = open_now = 0
    for _, step in edges:
        open_now += step
        most = max(most, open_now)
    return most


def datetime_of(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_the_in_process_worker_runs_a_storefront_request_on_a_thread_of_its_own(
        in_process: dict[str, str], tmp_path: Path) -> None:
    with open_shop(tmp_path, in_process) as shop:
        run = shop.wait(shop.request("IS-1001"))
        assert_authorized_with_label(shop, "IS-1001", run)
        assert run["labels"]["prefect.worker.type"] == IN_PROCESS
        assert run["infrastructure_pid"].endswith(f":{shop.worker.pid}")  # no process of its own
        assert run["name"] == "request-IS-1001"  # the order, not the customer's email
        pool = shop.call("GET", "/work_pools/returns").json()
        assert pool["type"] == IN_PROCESS
        assert set(pool["base_job_template"]["variables"]["properties"]) == {"name", "labels"}
        workers = shop.call("POST", "/work_pools/returns/workers/filter", json={}).json()
        assert [w["status"] for w in workers] == ["ONLINE"]


def test_a_scheduled_run_wakes_the_in_process_worker_long_before_its_timed_poll(
        in_process: dict[str, str], tmp_path: Path) -> None:
    with open_shop(tmp_path, in_process, poll=3600) as shop:
        queue = "/work_pools/returns/queues/default"
        deadline = time.monotonic() + 90
        while shop.call("GET", queue).json()["last_polled"] is None:  # the first timed poll, at start, is done
            assert shop.worker.poll() is None and time.monotonic() < deadline, shop.log.read_text()[-3000:]
            time.sleep(0.1)
        polled = shop.call("GET", queue).json()["last_polled"]
        run = shop.wait(shop.request("IS-1001"))  # the next timed poll is an hour away: only the event can wake it
        assert_authorized_with_label(shop, "IS-1001", run)
        assert datetime_of(shop.call("GET", queue).json()["last_polled"]) > datetime_of(polled)


def test_the_process_worker_runs_the_same_deployments_in_a_process_per_run(
        process_pool: dict[str, str], tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"  # the pull step, not the worker's directory, finds the entrypoints
    elsewhere.mkdir()
    with open_shop(tmp_path, process_pool, worker_type="process", cwd=elsewhere) as shop:
        run = shop.wait(shop.request("IS-1001"))
        assert_authorized_with_label(shop, "IS-1001", run)
        assert run["labels"]["prefect.worker.type"] == "process"
        assert run["infrastructure_pid"] != str(shop.worker.pid)
        assert shop.call("GET", "/work_pools/returns").json()["type"] == "process"
    assert list(elsewhere.iterdir()) == []


def test_a_worker_with_limit_2_never_runs_3_at_once(in_process: dict[str, str], tmp_path: Path,
                                                     gate: tuple[Gate, str]) -> None:
    held, smtp_url = gate
    orders = ["IS-1001", "IS-1002", "IS-1004", "IS-1007", "IS-1011"]
    with open_shop(tmp_path, in_process, limit=2, smtp_url=smtp_url) as shop:
        runs = {order: shop.request(order) for order in orders}
        held.wait_held(2, shop)
        running = [order for order, run_id in runs.items() if shop.run(run_id)["state"]["type"] == "RUNNING"]
        assert len(running) == 2, running
        # The worker keeps polling while both slots are taken: once the queue has been polled after the second
        # run started, the rest were offered to it and it left them Scheduled.
        started = max(s["timestamp"] for order in running for s in shop.states(runs[order]) if s["type"] == "RUNNING")
        queue = "/work_pools/returns/queues/default"
        while datetime_of(shop.call("GET", queue).json()["last_polled"]) <= datetime_of(started):
            time.sleep(0.1)
        waiting = {order: shop.run(run_id)["state"]["type"] for order, run_id in runs.items() if order not in running}
        assert waiting == {order: "SCHEDULED" for order in orders if order not in running}
        held.opened.set()
        for order, run_id in runs.items():
            assert_authorized_with_label(shop, order, shop.wait(run_id))
        assert most_at_once([claimed_to_final(shop, run_id) for run_id in runs.values()]) == 2


def test_sigterm_lets_the_runs_in_flight_finish_and_claims_no_more(in_process: dict[str, str], tmp_path: Path,
                                                                    gate: tuple[Gate, str]) -> None:
    # Only the in-process type: Prefect's process worker kills the processes of its runs in flight when it stops
    # (prefect/runner/_process_manager.py, ProcessManager.__aexit__), and those runs stay Running.
    held, smtp_url = gate
    with open_shop(tmp_path, in_process, smtp_url=smtp_url) as shop:
        runs = {order: shop.request(order) for order in ("IS-1001", "IS-1002")}
        held.wait_held(2, shop)
        shop.worker.terminate()  # SIGTERM, as a supervisor stops it
        while "Received SIGINT" not in shop.log.read_text("utf-8", "replace"):  # Prefect's handler has run
            assert shop.worker.poll() is None
            time.sleep(0.05)
        late = shop.request("IS-1004")
        time.sleep(2)  # ten polls' worth: a worker still polling would claim the late run now
        assert shop.worker.poll() is None, "the worker left before its runs in flight finished"
        held.opened.set()
        assert shop.worker.wait(timeout=90) == 0
        for order, run_id in runs.items():
            assert_authorized_with_label(shop, order, shop.run(run_id))
        assert shop.run(late)["state"]["type"] == "SCHEDULED"
        assert shop.returns_of("IS-1004") == []
        shop.call("DELETE", f"/flow_runs/{late}")  # not for the next test's worker


def test_a_cancelled_run_ends_cancelled_and_the_worker_serves_on(in_process: dict[str, str], tmp_path: Path,
                                                                 gate: tuple[Gate, str]) -> None:
    held, smtp_url = gate
    with open_shop(tmp_path, in_process, smtp_url=smtp_url) as shop:
        run_id = shop.request("IS-1001")
        held.wait_held(1, shop)
        cancel = {"state": {"type": "CANCELLING", "name": "Cancelling"}}
        assert shop.call("POST", f"/flow_runs/{run_id}/set_state", json=cancel).json()["status"] == "ACCEPT"
        held.opened.set()
        run = shop.wait(run_id)
        assert run["state"]["type"] == "CANCELLED", run["state"]
        assert "cannot be interrupted" in run["state"]["message"]
        assert_authorized_with_label(shop, "IS-1002", shop.wait(shop.request("IS-1002")))


def test_runs_on_our_threads_skip_prefects_suspension_observer(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.flow_engine as engine

    from entrypoints import worker

    assert callable(getattr(engine, "observe_flow_run_suspension", None)), "Prefect renamed the observer: re-measure"
    started: list[str] = []

    @contextmanager
    def observer(flow_run_id: str, request: object) -> Iterator[None]:
        started.append(flow_run_id)
        yield

    monkeypatch.setattr(engine, "observe_flow_run_suspension", observer)
    assert worker.guard_suspension_observer()
    with engine.observe_flow_run_suspension("elsewhere", None):  # a run Prefect's own runner started
        pass
    marked = worker._ON_OUR_THREAD.set(True)
    try:
        with engine.observe_flow_run_suspension("ours", None):
            pass
    finally:
        worker._ON_OUR_THREAD.reset(marked)
    assert started == ["elsewhere"]


def test_runs_on_one_thread_share_one_prefect_client(prefect_harness: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import flow
    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.states import Pending

    from entrypoints import worker

    @flow(name="kept-client-ping", persist_result=False)
    def ping(n: int) -> int:
        return n

    with get_client(sync_client=True) as client:
        runs = [client.create_flow_run(ping, parameters={"n": n}, state=Pending()) for n in (1, 2, 3)]
    built: list[SyncPrefectClient] = []
    init = SyncPrefectClient.__init__

    def counted(self: SyncPrefectClient, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(SyncPrefectClient, "__init__", counted)
    settings = worker.quiet_settings()
    states: list[Any] = []
    thread = threading.Thread(target=lambda: states.extend(worker.run_on_this_thread(ping, run, settings)
                                                           for run in runs))
    thread.start()
    thread.join(120)
    assert [s.type.value for s in states] == ["COMPLETED"] * 3
    assert len(built) == 1, f"{len(built)} Prefect clients for 3 runs on one thread"
