"""Time whole returns through the pipeline three ways: `python -m bench.pipeline [-n 100 1000] [--modes ...]`.

Every return is a P3 full refund (unwanted, unopened, bought 5 days ago) that is authorized, gets its RMA, label
PDF and "RMA issued" email, is received unopened at Lantana, refunded, and gets its "processed" email:

  floor   the domain alone, in-process, no Prefect: Pipeline.request + render_label + relay, then
          receive + process + relay (one caller, one return at a time)
  flows   the stage flows called in-process (`request_return(...)`, `record_receipt(...)`) against a local
          Prefect server, heartbeats off (one caller)
  served  the served deployments (flows.serve.serve in its own process) on a local Prefect server; the bench is
          the storefront: K clients POST create_flow_run on request-return/storefront (idempotency key per return)
          and wait for the run, then the dock does the same on record-receipt/lantana-dock

Each (mode, Prefect database, N) runs in its own subprocess (Prefect settings are per process) with a fresh
RETURNS_HOME and SQLite returns database under a temp dir, a fresh Prefect home and, for PostgreSQL, a freshly
created `prefect_bench` database. CPU and peak RSS come from /proc (client: getrusage of the bench process;
worker: the serving process; server: the `prefect server start` process tree; pg: the PostgreSQL backends of
`prefect_bench`). Results print as a markdown table and are written to bench/results/<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_DB = "prefect_bench"
PG_URL = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{PG_DB}"
MODES = ("floor", "flows", "served")
REQUEST_DEPLOYMENT = "request-return/storefront"
RECEIPT_DEPLOYMENT = "record-receipt/lantana-dock"
BATCH_DEPLOYMENT = "record-receipts/lantana-dock"  # bench.variants, --variant batch
SKUS = ("BN-SERUM-A", "BN-SERUM-B", "BN-CREAM-C", "BN-MASK-D", "BN-CLEANSE-E")

# ---- the synthetic shop: N customers, N orders, each a P3 full refund today ----------------------------------


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


# ---- /proc -------------------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[float, int, int] | None:
    """(CPU seconds user+system, session id, VmHWM kB) of a live process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of stat)
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return cpu, int(fields[3]), hwm


def session_pids(sid: int) -> list[int]:
    """Every live process in the session led by `sid` (a server started with start_new_session)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st and st[1] == sid:
                out.append(int(entry.name))
    return out


def pg_backend_pids(dbname: str = PG_DB) -> list[int]:
    """PostgreSQL backends serving `dbname` (their process title names the database)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("postgres: ") and f" {dbname} " in title:
                out.append(int(entry.name))
    return out


def machine_busy() -> float:
    """CPU seconds all processes on the machine have used since boot (every core; /proc/stat minus idle)."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(parts[:8]) - parts[3] - parts[4]) / CLK_TCK  # without idle and iowait


def wait_for_quiet(max_wait: float, threshold: float = 0.25, window: float = 5.0) -> float:
    """Wait (up to `max_wait` s) until other processes use less than `threshold` of a core over `window` s;
    returns what they used over the last window (cores). Someone's test suite on a 2-core machine halves our
    numbers, so the runs wait for a quiet machine and record how quiet it was."""
    end = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_busy(), time.monotonic()
        time.sleep(window)
        load = (machine_busy() - b0) / (time.monotonic() - t0)
        if load < threshold or time.monotonic() >= end:
            return load
        say(f"machine busy ({load:.2f} cores used by others); waiting for it to be quiet")


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def self_hwm_mb() -> float:
    st = proc_stat(os.getpid())
    return round(st[2] / 1024, 1) if st else 0.0


class Monitor:
    """Samples the CPU and VmHWM of process groups every `period` s (so exited processes still count)."""

    def __init__(self, groups: dict[str, Callable[[], Iterable[int]]], period: float = 0.5) -> None:
        self.groups = groups
        self.cpu: dict[str, dict[int, float]] = {g: {} for g in groups}
        self.hwm: dict[str, dict[int, int]] = {g: {} for g in groups}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="bench-monitor", daemon=True)
        self.period = period

    def sample(self) -> None:
        with self.lock:
            for group, pids in self.groups.items():
                for pid in pids():
                    st = proc_stat(pid)
                    if st:
                        self.cpu[group][pid] = st[0]
                        self.hwm[group][pid] = max(self.hwm[group].get(pid, 0), st[2])

    def _loop(self) -> None:
        while not self.stop_event.wait(self.period):
            self.sample()

    def start(self) -> Monitor:
        self.sample()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)

    def mark(self) -> dict[str, float]:
        """Cumulative CPU seconds per group right now."""
        self.sample()
        with self.lock:
            return {g: sum(v.values()) for g, v in self.cpu.items()}

    def peak_mb(self, group: str) -> float:
        """The largest VmHWM of one process of the group."""
        with self.lock:
            return round(max(self.hwm[group].values(), default=0) / 1024, 1)


# ---- small helpers -----------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def summary(values: list[float]) -> dict[str, float | None]:
    return {"p50": pct(values, 50), "p95": pct(values, 95), "max": max(values) if values else None,
            "mean": statistics.fmean(values) if values else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def iso(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def say(text: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"bench timeout while {what}")


class RetryCounter(logging.Filter):
    """Counts Prefect client retries (503/429 or transport errors, logged at DEBUG) and keeps other records
    at the level they had: attach to the `prefect.client` logger after lowering it to DEBUG."""

    def __init__(self, keep_level: int) -> None:
        super().__init__()
        self.keep_level = keep_level
        self.retries = 0
        self.by_status: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if "retryable" in msg:
            self.retries += 1
            key = "503" if " 503" in msg else "429" if " 429" in msg else "other"
            self.by_status[key] = self.by_status.get(key, 0) + 1
        return record.levelno >= self.keep_level


def count_prefect_client_retries() -> RetryCounter:
    import prefect.main  # noqa: F401 - configures logging; importing it later would reset the level set below

    lg = logging.getLogger("prefect.client")
    counter = RetryCounter(lg.getEffectiveLevel())
    lg.setLevel(logging.DEBUG)
    lg.addFilter(counter)
    return counter


# ---- PostgreSQL for the Prefect server ---------------------------------------------------------------------


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


def recreate_prefect_db(drop_only: bool = False) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
        if drop_only:
            return
        conn.execute(f"CREATE DATABASE {PG_DB}")
    with psycopg.connect(PG_ADMIN.replace("dbname=postgres", f"dbname={PG_DB}"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")


# ---- one run (a child process) -----------------------------------------------------------------------------


class Run:
    """One (mode, prefect db, N) measurement inside its own process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.mode: str = spec["mode"]
        self.n: int = spec["n"]
        self.db: str = spec["prefect_db"]
        self.work = Path(spec["workdir"])
        self.deadline = Deadline(spec["timeout"])
        self.tag = f"{int(time.time())}"
        self.variant: str = spec.get("variant", "as-is") if self.mode != "floor" else "as-is"
        self.batch: int = spec.get("batch", 10)
        self.result: dict[str, Any] = {"mode": self.mode, "prefect_db": self.db if self.mode != "floor" else "-",
                                       "n": self.n, "clients": spec["clients"] if self.mode == "served" else 1,
                                       "variant": self.variant, "notes": list(spec.get("notes", []))}
        if self.variant == "batch":
            self.result["batch"] = self.batch
        if self.mode == "served" and spec.get("no_suspension_observer"):
            self.result["no_suspension_observer"] = True
        if self.mode == "served":
            self.result["worker_poll"] = spec.get("worker_poll", 0.1)
        self.server: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.monitor: Monitor | None = None
        self.rmas: dict[int, str] = {}

    # -- setup --

    def setup_returns(self) -> None:
        home = self.work / "returns"
        home.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{home / 'returns.db'}"
        os.environ["RETURNS_HOME"], os.environ["RETURNS_DATABASE_URL"] = str(home), url
        os.environ.pop("RETURNS_SMTP_URL", None)
        from adapters.config import load_settings, settings
        from adapters.db import engine_for, upgrade
        from models.schemas import ImportIn, parse
        from service.steps import Pipeline

        settings.cache_clear()
        upgrade(url)
        self.pipeline = Pipeline(settings=load_settings(), engine=engine_for(url))
        counts = self.pipeline.import_data(parse(ImportIn, synthetic_catalog(self.n, datetime.now(UTC))))
        assert counts["orders_added"] == self.n, counts

    def start_prefect_server(self) -> None:
        from flows.serve import prefect_env, start_server

        port = free_port()
        self.prefect_home = self.work / "prefect"
        os.environ.update(prefect_env(self.prefect_home, port))
        self.api_url = os.environ["PREFECT_API_URL"]
        if self.db == "postgres":
            recreate_prefect_db()
            os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = PG_URL
        t0 = time.monotonic()
        try:
            if self.spec.get("profile"):
                self.server = self._start_profiled_server(port)
            else:
                self.server = start_server(self.prefect_home, port, timeout=min(120.0, self.deadline.left()))
        finally:
            os.environ.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # the server's setting only
        self.register_pid(self.server.pid)
        self.result["server_start_s"] = round(time.monotonic() - t0, 2)
        groups: dict[str, Callable[[], Iterable[int]]] = {"server": lambda: session_pids(self.server.pid)}
        if self.db == "postgres":
            groups["pg"] = pg_backend_pids
        if self.mode == "served":
            groups["worker"] = lambda: session_pids(self.worker.pid) if self.worker else []
        self.monitor = Monitor(groups).start()

    def _start_profiled_server(self, port: int) -> subprocess.Popen[bytes]:
        """`prefect server start` under cProfile (the API and its services share one event loop thread)."""
        from flows.serve import api_healthy

        self.server_profile = self.work / "server.prof"
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        log = open(self.prefect_home / "server.log", "ab")  # noqa: SIM115 - the server outlives this function
        proc = subprocess.Popen([sys.executable, "-m", "bench.pipeline", "_profiled_server", str(self.server_profile),
                                 "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while not api_healthy(self.api_url):
            self.deadline.check("starting the Prefect server")
            if proc.poll() is not None:
                raise RuntimeError(f"the Prefect server exited ({proc.returncode})")
            time.sleep(0.3)
        return proc

    def register_pid(self, pid: int) -> None:
        """Tell the parent which process groups to kill if this process dies without cleaning up."""
        with open(self.work / "pgids.txt", "a") as fh:
            fh.write(f"{pid}\n")

    def cleanup(self) -> None:
        from flows.serve import stop_server

        if self.worker is not None and self.worker.poll() is None:
            _stop_group(self.worker, grace=30)
        if self.server is not None:
            stop_server(self.server)
            prof = getattr(self, "server_profile", None)
            if prof is not None and prof.exists():
                self._profile_done(str(prof), "server")
        if self.monitor:
            self.monitor.stop()
        if self.db == "postgres" and self.mode != "floor":
            try:
                recreate_prefect_db(drop_only=True)
            except Exception as exc:  # noqa: BLE001
                say(f"could not drop {PG_DB}: {exc}")

    # -- the three ways --

    def run(self) -> dict[str, Any]:
        self.setup_returns()
        try:
            if self.mode == "floor":
                self.run_floor()
            elif self.mode == "flows":
                self.start_prefect_server()
                self.run_flows()
            else:
                self.start_prefect_server()
                self.run_served()
            self.verify()
        finally:
            self.cleanup()
        return self.result

    def _phase_end(self, lat: list[float], t_start: float, t_mid: float, t_end: float, cpu0: float) -> None:
        r = self.result
        r["phase_request_s"], r["phase_receipt_s"] = round(t_mid - t_start, 3), round(t_end - t_mid, 3)
        r["wall_s"] = round(t_end - t_start, 3)
        r["returns_per_s"] = round(self.n / (t_end - t_start), 3)
        r["latency_s"] = summary(lat)
        r["client_cpu_s"] = round(self_cpu() - cpu0, 2)
        ours = r["client_cpu_s"]
        if self.monitor is not None:
            ours += sum(v - self.m_start[g] for g, v in self.monitor.mark().items())
        # what other processes on the machine used while we measured (cores): a noisy run shows here
        r["others_cores"] = round(max(0.0, machine_busy() - self.busy0 - ours) / (t_end - t_start), 2)

    def run_floor(self) -> None:
        from models.schemas import ReceiptIn, ReturnRequestIn, parse
        from service.returns import Actor
        from service.steps import utcnow

        p = self.pipeline
        reqs = [parse(ReturnRequestIn, request_params(i, self.tag)) for i in range(self.n)]
        prof = self._profiler()
        cpu0, t0, self.busy0 = self_cpu(), time.monotonic(), machine_busy()
        lat = []
        for i, req in enumerate(reqs):
            s = time.monotonic()
            out = p.request(req, utcnow(), Actor("api"))
            assert out["state"] == "authorized", out
            p.render_label(out["rma_number"])
            lat.append(time.monotonic() - s)
            self.rmas[i] = out["rma_number"]
            p.relay(utcnow())
            self.deadline.check("requesting")
        t1 = time.monotonic()
        for i in range(self.n):
            receipt = parse(ReceiptIn, receipt_params(i, self.rmas[i], utcnow()))
            out = p.receive(receipt, utcnow())
            assert out["state"] == "received", out
            assert p.process(receipt.rma, utcnow(), Actor("operator:lantana-dock")) is not None
            p.relay(utcnow())
            self.deadline.check("receiving")
        t2 = time.monotonic()
        self._profile_done(prof, "client")
        self._phase_end(lat, t0, t1, t2, cpu0)
        self.result["client_rss_mb"] = self_hwm_mb()

    def run_flows(self) -> None:
        retries = count_prefect_client_retries()
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        from flows.serve import drain_prefect_workers
        from models.schemas import ReceiptLineIn, RequestLineIn
        from service.steps import utcnow

        if self.variant == "as-is":
            from flows.returns import record_receipt, request_return
        else:
            from bench.variants import record_receipt, record_receipts, request_return

        assert self.monitor is not None
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            # one warm-up flow call outside the timing would hide a per-process cost a served process pays
            # once too; we keep it inside, as it is 1 of N.
            self._measure_idle()
            prof = self._profiler()
            cpu0, m0, t0, self.busy0 = self_cpu(), self.monitor.mark(), time.monotonic(), machine_busy()
            self.m_start = m0
            lat = []
            for i in range(self.n):
                params = request_params(i, self.tag)
                params["lines"] = [RequestLineIn(**ln) for ln in params["lines"]]
                s = time.monotonic()
                out = request_return(**params)
                lat.append(time.monotonic() - s)
                assert out["state"] == "authorized", out
                self.rmas[i] = out["rma_number"]
                self.deadline.check("requesting")
            t1 = time.monotonic()
            if self.variant == "batch":
                for chunk in _chunks(list(range(self.n)), self.batch):
                    receipts = [receipt_params(i, self.rmas[i], utcnow()) for i in chunk]
                    out = record_receipts(receipts=receipts, by="lantana-dock")
                    assert out["completed"] == len(chunk), out
                    self.deadline.check("receiving")
            for i in range(self.n) if self.variant != "batch" else ():
                rp = receipt_params(i, self.rmas[i], utcnow())
                out = record_receipt(rma=rp["rma"], received_at=datetime.fromisoformat(rp["received_at"]),
                                     lines=[ReceiptLineIn(**ln) for ln in rp["lines"]], by=rp["by"])
                assert out["state"] == "completed", out
                self.deadline.check("receiving")
            t2 = time.monotonic()
            self._profile_done(prof, "client")
            self._phase_end(lat, t0, t1, t2, cpu0)
            s = time.monotonic()
            drain_prefect_workers()
            self.result["client_drain_s"] = round(time.monotonic() - s, 2)
        self.result["client_cpu_incl_drain_s"] = round(self_cpu() - cpu0, 2)
        self.result["client_rss_mb"] = self_hwm_mb()
        self.result["client_retries"] = retries.by_status
        self._settle(m0, t2)

    def run_served(self) -> None:
        assert self.monitor is not None
        env = dict(os.environ)
        if self.spec.get("profile"):
            env["BENCH_PROFILE_PATH"] = str(Path(self.spec["profile_dir"]) / f"{self.spec['label']}-worker.txt")
        stats_file = self.work / "worker-stats.json"
        cmd = [sys.executable, "-m", "bench.pipeline", "_serve", str(stats_file),
               f"--poll={self.spec.get('worker_poll', 0.1)}", f"--workers={self.spec.get('workers', 4)}",
               f"--variant={self.variant}"]
        if self.spec.get("no_suspension_observer"):
            cmd.append("--no-suspension-observer")
        if self.spec.get("profile"):
            cmd.append("--profile")
        wlog = open(self.work / "worker.log", "ab")  # noqa: SIM115 - the worker outlives this statement
        t0 = time.monotonic()
        self.worker = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=wlog, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.register_pid(self.worker.pid)
        api = CountingApi(self.api_url)
        while True:  # the worker registers the deployments, then polls
            self.deadline.check("waiting for the deployments")
            if self.worker.poll() is not None:
                raise RuntimeError(f"the serving process exited ({self.worker.returncode}); see worker.log")
            try:
                api.deployment_id(REQUEST_DEPLOYMENT), api.deployment_id(RECEIPT_DEPLOYMENT)
                api.deployment_id("outbox-relay/every-minute")  # the last one registered
                break
            except Exception:  # noqa: BLE001 - 404 until registered
                time.sleep(0.2)
        self.result["worker_start_s"] = round(time.monotonic() - t0, 2)
        time.sleep(1.0)  # let the first poll loop settle
        k, poll = self.spec["clients"], self.spec["poll"]
        apis: list[Any] = []  # one REST client per storefront / dock thread
        local = threading.local()
        lock = threading.Lock()

        def client() -> Any:
            if not hasattr(local, "api"):
                local.api = CountingApi(self.api_url)
                local.api._deployments = dict(api._deployments)
                with lock:
                    apis.append(local.api)
            return local.api

        def one_request(i: int) -> dict[str, Any]:
            params = request_params(i, self.tag)
            wall, s = time.time(), time.monotonic()
            run_id = client().create_run(REQUEST_DEPLOYMENT, params, idempotency_key=params["idempotency_key"])
            created = time.monotonic()
            run = client().wait(run_id, timeout=max(1.0, self.deadline.left()), poll=poll)
            return {"i": i, "wall": wall, "lat": time.monotonic() - s, "post": created - s, "run": _run_times(run),
                    "id": run_id}

        def one_receipt(i: int) -> dict[str, Any]:
            from service.steps import utcnow

            params = receipt_params(i, self.rmas[i], utcnow())
            s = time.monotonic()
            run_id = client().create_run(RECEIPT_DEPLOYMENT, params, idempotency_key=f"receipt-{self.tag}-{i}")
            run = client().wait(run_id, timeout=max(1.0, self.deadline.left()), poll=poll)
            return {"i": i, "lat": time.monotonic() - s, "run": _run_times(run), "id": run_id}

        def one_batch(chunk: list[int]) -> dict[str, Any]:
            from service.steps import utcnow

            params = {"receipts": [receipt_params(i, self.rmas[i], utcnow()) for i in chunk], "by": "lantana-dock"}
            s = time.monotonic()
            run_id = client().create_run(BATCH_DEPLOYMENT, params, idempotency_key=f"receipts-{self.tag}-{chunk[0]}")
            run = client().wait(run_id, timeout=max(1.0, self.deadline.left()), poll=poll)
            return {"i": chunk[0], "lat": time.monotonic() - s, "run": _run_times(run), "id": run_id}

        self._measure_idle()
        prof = self._profiler()
        cpu0, m0, t0, self.busy0 = self_cpu(), self.monitor.mark(), time.monotonic(), machine_busy()
        self.m_start = m0
        with ThreadPoolExecutor(max_workers=k, thread_name_prefix="storefront") as pool:
            requests = list(pool.map(one_request, range(self.n)))
        t1 = time.monotonic()
        self.rmas = self._rmas_by_order()
        with ThreadPoolExecutor(max_workers=k, thread_name_prefix="dock") as pool:
            if self.variant == "batch":
                receipts = list(pool.map(one_batch, _chunks(list(range(self.n)), self.batch)))
            else:
                receipts = list(pool.map(one_receipt, range(self.n)))
        t2 = time.monotonic()
        self._profile_done(prof, "client")
        m_end = self.monitor.mark()
        self._phase_end([r["lat"] for r in requests], t0, t1, t2, cpu0)
        r = self.result
        r["client_rss_mb"] = self_hwm_mb()
        r["client_retries"] = {str(code): sum(a.retried.get(code, 0) for a in apis) for code in (503, 429)}
        r["client_polls"] = sum(a.polls for a in apis)
        r["client_calls_past_12_attempts"] = sum(a.beyond_12 for a in apis)
        r["post_s"] = summary([q["post"] for q in requests])
        r["label_latency_s"] = summary(self._label_latencies(requests))
        r["request_run"] = _decompose(requests)
        r["receipt_run"] = _decompose(receipts)
        r["receipt_latency_s"] = summary([q["lat"] for q in receipts])
        r["worker_cpu_s"] = round(m_end["worker"] - m0["worker"], 2)
        self._settle(m0, t2)
        r["request_states"] = self._state_gaps(api, [q["id"] for q in requests])
        r["receipt_states"] = self._state_gaps(api, [q["id"] for q in receipts])
        # stop the worker (it reports its own retry counts and profile on the way out)
        _stop_group(self.worker, grace=30)
        r["worker_rss_mb"] = self.monitor.peak_mb("worker")
        if stats_file.exists():
            r["worker_stats"] = json.loads(stats_file.read_text())

    # -- measurements shared by flows and served --

    def _measure_idle(self, seconds: float = 4.0) -> None:
        """The server's CPU use with nothing to do but answer the serving process's polls (its idle floor)."""
        assert self.monitor is not None
        m0, t0 = self.monitor.mark(), time.monotonic()
        time.sleep(seconds)
        m1, t1 = self.monitor.mark(), time.monotonic()
        self.idle = {g: (m1[g] - m0[g]) / (t1 - t0) for g in m0}
        self.result["idle_cpu_per_s"] = {g: round(v, 3) for g, v in self.idle.items()}

    def _settle(self, m0: dict[str, float], t_end: float) -> None:
        """Wait until the server has ingested what the clients sent (its CPU back to the idle floor), then count
        its records; the CPU it spends after the last client call is the backlog of events it still had."""
        assert self.monitor is not None
        m_end = self.monitor.mark()
        idle = sum(v for g, v in self.idle.items() if g != "worker")
        last, quiet_since, m_quiet = m_end, time.monotonic(), m_end
        while time.monotonic() - t_end < 300 and self.deadline.left() > 30:
            time.sleep(1.0)
            now = self.monitor.mark()
            busy = sum(now[g] - last[g] for g in now if g != "worker")
            last = now
            if busy > idle + 0.06:
                quiet_since, m_quiet = time.monotonic(), now
            elif time.monotonic() - quiet_since >= 3.0:
                break
        r = self.result
        settle = max(0.0, quiet_since - t_end)
        r["server_settle_s"] = round(settle, 1)
        r["server_cpu_s"] = round(m_end["server"] - m0["server"], 2)
        # the backlog: CPU after the last client call until the server is back to its idle floor
        backlog = m_quiet["server"] - m_end["server"] - self.idle["server"] * settle
        r["server_cpu_incl_settle_s"] = round(r["server_cpu_s"] + max(0.0, backlog), 2)
        if "pg" in m0:
            r["pg_cpu_s"] = round(m_end["pg"] - m0["pg"], 2)
            r["pg_cpu_incl_settle_s"] = round(m_quiet["pg"] - m0["pg"] - self.idle["pg"] * settle, 2)
        r["server_rss_mb"] = self.monitor.peak_mb("server")
        r["prefect_objects"] = self._count_objects()
        r["server_503"] = self._server_log_count('" 503')
        if r["prefect_objects"].get("task_runs"):
            server_total = r["server_cpu_incl_settle_s"] + r.get("pg_cpu_incl_settle_s", 0)
            r["server_cpu_ms_per_task_run"] = round(1000 * server_total / r["prefect_objects"]["task_runs"], 1)
            r["server_cpu_ms_per_return"] = round(1000 * server_total / self.n, 1)

    def _count_objects(self) -> dict[str, Any]:
        import httpx

        out: dict[str, Any] = {}
        with httpx.Client(base_url=self.api_url, timeout=30) as http:
            for what in ("flow_runs", "task_runs", "artifacts"):
                try:
                    out[what] = http.post(f"/{what}/count", json={}).json()
                except Exception as exc:  # noqa: BLE001
                    out[what] = f"error: {exc}"
            try:
                body = {"filter": {"event": {"prefix": ["returns."]}, "occurred": {
                    "since": (datetime.now(UTC) - timedelta(days=1)).isoformat()}}, "limit": 1}
                out["returns_events"] = http.post("/events/filter", json=body).json().get("total")
                body["filter"]["event"] = {"prefix": ["prefect."]}
                out["prefect_events"] = http.post("/events/filter", json=body).json().get("total")
            except Exception as exc:  # noqa: BLE001
                out["events"] = f"error: {exc}"
            try:
                runs = http.post("/flow_runs/filter", json={"limit": 200, "flows": {"name": {"any_": [
                    "outbox-relay", "deadline-sweep"]}}}).json()
                out["scheduled_runs_executed"] = sum(1 for x in runs if x["state"]["type"] == "COMPLETED")
            except Exception as exc:  # noqa: BLE001
                out["scheduled_runs_executed"] = f"error: {exc}"
        return out

    def _state_gaps(self, api: Any, run_ids: list[str], sample: int = 60) -> dict[str, Any]:
        """From each run's state history: Scheduled -> Pending (the runner's poll and claim), Pending -> Running
        (the engine starting the run in the serving process), Running -> Completed (the flow)."""
        gaps: dict[str, list[float]] = {"scheduled_to_pending": [], "pending_to_running": [],
                                        "running_to_completed": []}
        step = max(1, len(run_ids) // sample)
        for run_id in run_ids[::step]:
            r = api._call("GET", "/flow_run_states/", params={"flow_run_id": run_id})
            if r.status_code != 200:
                continue
            at = {}
            for st in r.json():
                at.setdefault(st["type"], iso(st["timestamp"]))
            for name, a, b in (("scheduled_to_pending", "SCHEDULED", "PENDING"),
                               ("pending_to_running", "PENDING", "RUNNING"),
                               ("running_to_completed", "RUNNING", "COMPLETED")):
                if at.get(a) and at.get(b):
                    gaps[name].append((at[b] - at[a]).total_seconds())
        return {k: summary(v) for k, v in gaps.items()}

    def _server_log_count(self, needle: str) -> int:
        try:
            return (self.prefect_home / "server.log").read_text(errors="replace").count(needle)
        except OSError:
            return -1

    def _rmas_by_order(self) -> dict[int, str]:
        from sqlalchemy import select

        from adapters.db import unit_of_work
        from models.tables import Return

        with unit_of_work(self.pipeline.engine) as session:
            rows = session.execute(select(Return.order_number, Return.rma)).all()
        out = {int(o.split("-")[1]): r for o, r in rows if o.startswith("BN-") and r}
        assert len(out) == self.n, f"{len(out)} RMAs for {self.n} requests"
        return out

    def _label_latencies(self, requests: list[dict[str, Any]]) -> list[float]:
        from adapters.label.layout import label_path

        out = []
        for q in requests:
            path = label_path(self.pipeline.settings.label_dir, self.rmas[q["i"]])
            out.append(path.stat().st_mtime - q["wall"])
        return out

    def verify(self) -> None:
        """Every return ended completed, with its label and its three emails (RMA issued, received, processed)."""
        from sqlalchemy import func, select

        from adapters.db import unit_of_work
        from models.tables import Return

        with unit_of_work(self.pipeline.engine) as session:
            states = dict(session.execute(select(Return.state, func.count()).group_by(Return.state)).all())
        home = self.pipeline.settings.home
        v = {"states": states, "labels": len(list((home / "labels").glob("*.pdf"))),
             "emails": len(list((home / "mail").glob("*.eml"))), "outbox": self.pipeline.outbox_counts()}
        v["ok"] = states == {"completed": self.n} and v["labels"] == self.n and v["emails"] == 3 * self.n
        if v["outbox"]["pending"] or v["outbox"]["failed"]:
            from sqlalchemy import select

            from models.tables import OutboxMessage

            with unit_of_work(self.pipeline.engine) as session:
                rows = session.execute(select(OutboxMessage.kind, OutboxMessage.status, OutboxMessage.attempts,
                                              OutboxMessage.last_error).where(OutboxMessage.status != "sent")).all()
            v["unsent"] = [{"kind": k, "status": st, "attempts": a, "last_error": (e or "")[:200]}
                           for k, st, a, e in rows]
        self.result["verify"] = v

    # -- profiling --

    def _profiler(self) -> Any:
        if not self.spec.get("profile"):
            return None
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        return prof

    def _profile_done(self, prof: Any, who: str) -> None:
        if prof is None:
            return
        if hasattr(prof, "disable"):
            prof.disable()
        path = Path(self.spec["profile_dir"]) / f"{self.spec['label']}-{who}.txt"
        _write_profile([prof], path)
        self.result.setdefault("profiles", []).append(str(path.relative_to(ROOT)))


def _write_profile(profs: list[Any], path: Path) -> None:
    import io
    import pstats

    if not profs:
        return
    buf = io.StringIO()
    st = pstats.Stats(profs[0], stream=buf)
    for p in profs[1:]:
        st.add(p)
    st.sort_stats("tottime").print_stats(45)
    st.sort_stats("cumulative").print_stats(60)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue())


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _run_times(run: dict[str, Any]) -> dict[str, Any]:
    return {"created": run.get("created"), "start": run.get("start_time"), "end": run.get("end_time"),
            "seen": datetime.now(UTC).isoformat()}


def _decompose(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a served run's latency goes: created -> Running (poll + claim + engine), Running -> Completed,
    Completed -> the client sees it (its poll)."""
    queued, running, seen = [], [], []
    for q in items:
        t = q["run"]
        c, s, e, w = iso(t["created"]), iso(t["start"]), iso(t["end"]), iso(t["seen"])
        if c and s and e and w:
            queued.append((s - c).total_seconds())
            running.append((e - s).total_seconds())
            seen.append((w - e).total_seconds())
    return {"created_to_running": summary(queued), "running_to_completed": summary(running),
            "completed_to_seen": summary(seen)}


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _counting_api() -> type:
    from entrypoints.prefect_api import PrefectApi

    class _CountingApi(PrefectApi):
        """The storefront's REST client, counting the 503/429 answers it retries and the polls it makes."""

        polls = 0

        def __init__(self, api_url: str) -> None:
            super().__init__(api_url)
            self.retried: dict[int, int] = {}
            self.beyond_12 = 0

        def _call(self, method: str, url: str, **kwargs: Any) -> Any:
            import httpx

            # PrefectApi's schedule (0.05 s doubling to 2 s), but for up to 120 s instead of 12 attempts, so that
            # a busy SQLite server slows the run down instead of failing it; calls that PrefectApi would have
            # given up on are counted.
            delay, give_up, attempt = 0.05, time.monotonic() + 120, 0
            while True:
                attempt += 1
                try:
                    r = self.http.request(method, url, **kwargs)
                    if method == "GET" and url.startswith("/flow_runs/"):
                        self.polls += 1
                    if r.status_code not in (429, 503):
                        return r
                    self.retried[r.status_code] = self.retried.get(r.status_code, 0) + 1
                except httpx.TransportError:
                    if time.monotonic() > give_up:
                        raise
                if time.monotonic() > give_up:
                    return r
                if attempt == 12:
                    self.beyond_12 += 1
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    return _CountingApi


def CountingApi(api_url: str) -> Any:  # noqa: N802 - a factory standing in for the class
    return _counting_api()(api_url)


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.chdir(ROOT)
    run = Run(spec)

    def on_term(*_: Any) -> None:
        raise SystemExit(143)  # unwinds through Run.run's finally: servers are stopped

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = run.run()
    except BaseException as exc:
        run.result["error"] = f"{type(exc).__name__}: {exc}"
        result = run.result
        Path(spec["result_path"]).write_text(json.dumps(result, indent=1, default=str))
        raise
    Path(spec["result_path"]).write_text(json.dumps(result, indent=1, default=str))
    return 0


# ---- the serving process of the `served` mode --------------------------------------------------------------


def serve_main(stats_path: str, profile: bool, poll: float, workers: int, variant: str,
               no_observer: bool = False) -> int:
    """flows.serve.serve(), plus the Prefect client's retry count (and a per-flow-run profile) on the way out;
    with a variant, its flows are served under the same deployment names (bench.variants)."""
    retries = count_prefect_client_retries()
    import flows.serve as fs

    if no_observer:
        # An experiment, not a recommendation: Prefect 3.9 starts, for every flow run of a deployment, a thread
        # with its own event loop, API client and events websocket (with a one-minute backfill) to notice an
        # external "suspend" request. The pipeline never suspends runs; this measures what that costs.
        import contextlib

        import prefect.flow_engine as fe

        fe.observe_flow_run_suspension = lambda *_a, **_k: contextlib.nullcontext()  # type: ignore[assignment]

    if variant != "as-is":
        from bench.variants import deployment_specs

        specs = deployment_specs(variant)  # built from flows.serve's own list before it is replaced
        fs.deployment_specs = lambda: specs  # type: ignore[assignment]

    profs: list[Any] = []
    if profile:
        import cProfile

        original = fs.InProcessRunner._execute
        plock = threading.Lock()

        def profiled(self: Any, run: Any) -> None:
            prof = cProfile.Profile()
            prof.enable()
            try:
                original(self, run)
            finally:
                prof.disable()
                with plock:
                    profs.append(prof)

        fs.InProcessRunner._execute = profiled  # type: ignore[method-assign]
    cpu0 = self_cpu()
    try:
        fs.serve(poll_seconds=poll, workers=workers)
    finally:
        stats = {"retries": retries.retries, "retries_by_status": retries.by_status,
                 "client_log_level": logging.getLogger("prefect.client").getEffectiveLevel(),
                 "cpu_s_total": round(self_cpu() - cpu0, 2), "flow_runs_profiled": len(profs)}
        if profs:
            path = Path(os.environ["BENCH_PROFILE_PATH"])
            _write_profile(profs, path)
            stats["profile"] = str(path)
        Path(stats_path).write_text(json.dumps(stats))
    return 0


def profiled_server_main(out: str, argv: list[str]) -> int:
    """`prefect <argv>` under cProfile; the profile is written when the server shuts down (SIGTERM)."""
    import cProfile

    sys.argv = ["prefect", *argv]
    prof = cProfile.Profile()

    def dump(*_: Any) -> None:
        # uvicorn shuts down gracefully on SIGTERM, then restores this handler and raises the signal again
        prof.disable()
        prof.dump_stats(out)
        os._exit(0)

    signal.signal(signal.SIGTERM, dump)
    prof.enable()
    try:
        from prefect.cli import app

        app()
    except SystemExit:
        pass
    finally:
        prof.disable()
        prof.dump_stats(out)
    return 0


# ---- the parent: one child per row, a table, a JSON file ---------------------------------------------------


def _kill_leftovers(pgid_file: Path) -> None:
    """Kill the process groups a child registered if they are still ours and alive (the child crashed)."""
    if not pgid_file.exists():
        return
    for line in pgid_file.read_text().split():
        pid = int(line)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"prefect" in cmd or b"bench.pipeline" in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    work = Path(spec["workdir"])
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    say(f"{spec['label']}: starting (timeout {timeout:.0f} s)")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "bench.pipeline", "_child", str(spec_path)], cwd=ROOT,
                            start_new_session=True)

    def on_signal(signum: int, _frame: Any) -> None:
        _stop_group(proc, grace=60)  # the child stops its servers on SIGTERM
        _kill_leftovers(work / "pgids.txt")
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        proc.wait(timeout=timeout + 60)  # the child enforces `timeout` itself; this is the backstop
    except subprocess.TimeoutExpired:
        say(f"{spec['label']}: over time, stopping it")
        _stop_group(proc, grace=60)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _kill_leftovers(work / "pgids.txt")
    path = Path(spec["result_path"])
    result = json.loads(path.read_text()) if path.exists() else {
        "mode": spec["mode"], "prefect_db": spec["prefect_db"], "n": spec["n"], "error": f"exit {proc.returncode}"}
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    say(f"{spec['label']}: " + (f"error {result['error']}" if "error" in result else
                                f"{result['returns_per_s']} returns/s, p50 {result['latency_s']['p50']:.3f} s, "
                                f"verify {'ok' if result['verify']['ok'] else result['verify']}"))
    return result


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| mode | prefect db | N | returns/s | x floor | p50 RMA s | p95 RMA s | client CPU s | worker CPU s "
            "| server CPU s | server CPU ms/return | client RSS MB | worker RSS MB | server RSS MB | ok |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    floor = {r.get("requested_n", r["n"]): r.get("returns_per_s") for r in rows
             if r["mode"] == "floor" and "error" not in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['mode']} | {r['prefect_db']} | {r['n']} | error: {r['error'][:80]} |" + " |" * 11)
            continue
        lat = r["latency_s"]
        server = r.get("server_cpu_incl_settle_s")
        server_txt = "-" if server is None else _f(server, 1) + (
            f" (+{_f(r['pg_cpu_incl_settle_s'], 1)} pg)" if "pg_cpu_incl_settle_s" in r else "")
        ratio = floor.get(r.get("requested_n", r["n"]))
        n_txt = f"{r['n']}" if r.get("requested_n", r["n"]) == r["n"] else f"{r['n']} (for {r['requested_n']})"
        ratio_txt = "1" if r["mode"] == "floor" else (f"1/{ratio / r['returns_per_s']:.0f}" if ratio else "-")
        tags = [] if r.get("variant", "as-is") == "as-is" else [r["variant"] + (f" {r['batch']}" if "batch" in r
                                                                                 else "")]
        if r.get("no_suspension_observer"):
            tags.append("no observer")
        if r.get("clients", 1) != 4 and r["mode"] == "served":
            tags.append(f"{r['clients']} client")
        mode = r["mode"] + (f" ({', '.join(tags)})" if tags else "")
        out.append(" | ".join([
            f"| {mode}", r["prefect_db"], n_txt, _f(r["returns_per_s"], 2), ratio_txt, _f(lat["p50"], 3),
            _f(lat["p95"], 3), _f(r.get("client_cpu_incl_drain_s", r["client_cpu_s"]), 1),
            _f(r.get("worker_cpu_s"), 1), server_txt, _f(r.get("server_cpu_ms_per_return"), 0),
            _f(r.get("client_rss_mb"), 0), _f(r.get("worker_rss_mb"), 0), _f(r.get("server_rss_mb"), 0),
            "yes" if r["verify"]["ok"] else "NO"]) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, nargs="+", default=[100, 1000], help="returns per run (default 100 1000)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of floor,flows,served")
    ap.add_argument("--prefect-db", default="sqlite,postgres",
                    help="comma list of sqlite,postgres (postgres skipped when 127.0.0.1:5432 does not answer)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent storefront clients in `served` (default 4)")
    ap.add_argument("--poll", type=float, default=0.05, help="client poll period for a run's state, s")
    ap.add_argument("--worker-poll", type=float, default=0.1,
                    help="the serving process's poll for scheduled runs, s (flows.serve.serve's default 0.1)")
    ap.add_argument("--workers", type=int, default=4, help="flow-run threads of the serving process (default 4)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is stopped")
    ap.add_argument("--budget", type=float, default=900,
                    help="a Prefect run predicted (from the same mode at a smaller N) to take longer than this many "
                         "seconds runs with --fallback-n returns instead (default 900)")
    ap.add_argument("--fallback-n", type=int, default=300)
    ap.add_argument("--variant", default="as-is", choices=("as-is", "lean", "batch"),
                    help="flow shapes for flows/served: as-is (flows/), or a proposal from bench/variants.py")
    ap.add_argument("--batch", type=int, default=10, help="receipts per record-receipts run (--variant batch)")
    ap.add_argument("--no-suspension-observer", action="store_true",
                    help="experiment: the serving process skips Prefect's per-run suspension observer (served)")
    ap.add_argument("--profile", action="store_true", help="cProfile the client (and the served flow runs)")
    ap.add_argument("--quiet-wait", type=float, default=600,
                    help="before each run, wait up to this many seconds for other processes to leave the CPUs "
                         "(under 0.25 core); 0 to start at once")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (databases, labels, mail, server logs)")
    ap.add_argument("--table", metavar="JSON", help="print the table of an earlier results file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())["rows"]))
        return 0
    modes = [m for m in args.modes.split(",") if m]
    dbs = [d for d in args.prefect_db.split(",") if d]
    if bad := [m for m in modes if m not in MODES] + [d for d in dbs if d not in ("sqlite", "postgres")]:
        ap.error(f"unknown mode or database: {bad}")
    notes = []
    if "postgres" in dbs and not postgres_available():
        dbs.remove("postgres")
        notes.append("PostgreSQL not reachable on 127.0.0.1:5432: postgres rows skipped")
        say(notes[-1])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"pipeline-{stamp}.json"
    rows: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    plan = [(n, m, "-" if m == "floor" else d) for n in sorted(args.n) for m in modes
            for d in (dbs[:1] if m == "floor" else dbs)]
    try:
        for n, mode, db in plan:
            run_n, row_notes = n, []
            rates = [r["returns_per_s"] for r in rows if r["mode"] == mode and r["prefect_db"] == db
                     and "error" not in r and r["n"] < n]
            if mode != "floor" and rates and n / rates[-1] > args.budget and args.fallback_n < n:
                run_n = args.fallback_n
                row_notes.append(f"N={n} predicted {n / rates[-1]:.0f} s > budget {args.budget:.0f} s: "
                                 f"ran N={run_n}")
                say(row_notes[-1])
            label = f"{mode}-{run_n}" if db == "-" else f"{mode}-{db}-{run_n}"
            if mode != "floor" and args.variant != "as-is":
                label += f"-{args.variant}"
            if mode == "served" and args.no_suspension_observer:
                label += "-noobs"
            work = root / label
            work.mkdir(parents=True)
            spec = {"mode": mode, "prefect_db": db, "n": run_n, "clients": args.clients, "poll": args.poll,
                    "worker_poll": args.worker_poll, "workers": args.workers, "variant": args.variant,
                    "batch": args.batch, "no_suspension_observer": args.no_suspension_observer,
                    "timeout": args.timeout, "workdir": str(work), "result_path": str(work / "result.json"),
                    "profile": args.profile, "profile_dir": str(RESULTS / f"profile-{stamp}"), "label": label,
                    "notes": row_notes}
            others = wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else None
            commit = code_version()
            rows.append(run_child(spec, args.timeout))
            rows[-1]["commit"] = commit if commit == code_version() else f"{commit} -> {code_version()} (changed)"
            rows[-1]["others_cores_before"] = None if others is None else round(others, 2)
            rows[-1]["requested_n"] = n
            doc = {"command": " ".join(["python -m bench.pipeline", *(argv if argv is not None else sys.argv[1:])]),
                   "when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "notes": notes,
                   "rows": rows}
            out_path.write_text(json.dumps(doc, indent=1, default=str))
    finally:
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(table(rows))
    print(f"\n{out_path.relative_to(ROOT)}")
    return 0 if all("error" not in r and r["verify"]["ok"] for r in rows) else 1


def code_version() -> str:
    """The commit the run measured, with '+dirty' when flows/, tasks/, service/ or models/ have local changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "flows", "tasks", "service", "models"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")),
               "0")
    import importlib.metadata as md

    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_gb": round(int(mem) / 2**20, 1),
            "python": platform.python_version(), "prefect": md.version("prefect"), "kernel": platform.release(),
            "date": date.today().isoformat()}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2]))
    if len(sys.argv) > 2 and sys.argv[1] == "_profiled_server":
        sys.exit(profiled_server_main(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) > 2 and sys.argv[1] == "_serve":
        opts = dict(a[2:].split("=", 1) for a in sys.argv[3:] if "=" in a)
        sys.exit(serve_main(sys.argv[2], "--profile" in sys.argv[3:], float(opts.get("poll", 0.1)),
                            int(opts.get("workers", 4)), opts.get("variant", "as-is"),
                            "--no-suspension-observer" in sys.argv[3:]))
    sys.exit(main())
