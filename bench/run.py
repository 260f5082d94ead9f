"""One (mode, Prefect database, N) measurement, inside a process of its own: the returns database, the Prefect
server, the process groups watched, what the server did once the clients stopped, and the check that every
return ended completed with its label and three emails."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.measure import (
    PG_DB,
    PG_URL,
    Deadline,
    Monitor,
    free_port,
    iso,
    machine_busy,
    pg_backend_pids,
    recreate_prefect_db,
    say,
    self_cpu,
    session_pids,
    stop_group,
    summary,
    write_profile,
)
from bench.workload import synthetic_catalog
from entrypoints.prefect_server import WORKER_POLL_SECONDS

ROOT = Path(__file__).resolve().parent.parent
REQUEST_DEPLOYMENT = "request-return/storefront"
RECEIPT_DEPLOYMENT = "record-receipt/lantana-dock"


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
        self.result: dict[str, Any] = {"mode": self.mode, "prefect_db": self.db if self.mode != "floor" else "-",
                                       "n": self.n, "clients": spec["clients"] if self.mode in ("served", "api") else 1,
                                       "notes": list(spec.get("notes", []))}
        if self.mode in ("served", "api"):
            self.result["worker_poll"] = spec.get("worker_poll", WORKER_POLL_SECONDS)
            self.result["dock_waits_on"] = spec.get("dock_waits_on", "prefect")
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
        assert counts.orders_added == self.n, counts

    def start_prefect_server(self) -> None:
        from entrypoints.prefect_server import prefect_env, start_server

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
        if self.mode in ("served", "api"):
            groups["worker"] = lambda: session_pids(self.worker.pid) if self.worker else []
        self.monitor = Monitor(groups).start()

    def _start_profiled_server(self, port: int) -> subprocess.Popen[bytes]:
        """`prefect server start` under cProfile (the API and its services share one event loop thread)."""
        from entrypoints.prefect_server import wait_until_healthy

        self.server_profile = self.work / "server.prof"
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        log = open(self.prefect_home / "server.log", "ab")  # noqa: SIM115 - the server outlives this function
        proc = subprocess.Popen([sys.executable, "-m", "bench.pipeline", "_profiled_server", str(self.server_profile),
                                 "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_healthy(proc, self.api_url, lambda: self.deadline.check("starting the Prefect server") or False)
        return proc

    def register_pid(self, pid: int) -> None:
        """Tell the parent which process groups to kill if this process dies without cleaning up."""
        with open(self.work / "pgids.txt", "a") as fh:
            fh.write(f"{pid}\n")

    def cleanup(self) -> None:
        from entrypoints.prefect_server import stop_server

        if self.worker is not None and self.worker.poll() is None:
            stop_group(self.worker, grace=30)
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
            if self.mode != "floor":
                self.start_prefect_server()
            from bench import modes

            getattr(modes, self.mode)(self)  # floor, flows, served or api
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

    # -- measurements shared by flows and served --

    def _measure_idle(self, seconds: float = 4.0) -> None:
        """The server's CPU use with nothing to do but answer the serving process's polls (its idle floor)."""
        assert self.monitor is not None
        self.idle = self.monitor.idle_rate(seconds)
        self.result["idle_cpu_per_s"] = {g: round(v, 3) for g, v in self.idle.items()}

    def _settle(self, m0: dict[str, float], t_end: float) -> None:
        """Wait until the server has ingested what the clients sent (its CPU back to the idle floor), then count
        its records; the CPU it spends after the last client call is the backlog of events it still had."""
        assert self.monitor is not None
        m_end = self.monitor.mark()
        groups = [g for g in self.idle if g != "worker"]
        quiet_since, m_quiet = self.monitor.until_quiet(
            sum(self.idle[g] for g in groups), 0.06, groups,
            more=lambda: time.monotonic() - t_end < 300 and self.deadline.left() > 30)
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

    def wait_completed(self, rma: str, timeout: float) -> None:
        """Until the return is completed in the returns database (the truth), read with a growing pause."""
        from sqlalchemy import select

        from adapters.db import unit_of_work
        from models.tables import Return

        deadline, pause = time.monotonic() + timeout, 0.02
        while time.monotonic() < deadline:
            with unit_of_work(self.pipeline.engine) as session:
                if session.execute(select(Return.state).where(Return.rma == rma)).scalar_one() == "completed":
                    return
            time.sleep(pause)
            pause = min(pause * 1.5, 0.2)
        raise TimeoutError(f"{rma} not completed within {timeout:.0f} s")

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
        write_profile([prof], path)
        self.result.setdefault("profiles", []).append(str(path.relative_to(ROOT)))

