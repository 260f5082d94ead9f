"""What each Prefect object costs on a local server: `python -m bench.prefect_costs [--prefect-db sqlite,postgres]`.

The served pipeline spends, per return, 2 flow runs, 10 task runs, 2 artifacts, 7 custom events and a number of
polls. This measures each of those alone (one in-process client, heartbeats off, the task options the pipeline
uses) so the pipeline's server CPU can be attributed: client wall and CPU per operation, and the server's CPU per
operation (PostgreSQL backends included), counted until the server is back to its idle floor.
Each database runs in its own subprocess with a fresh server; results print as markdown and go to
bench/results/prefect-costs-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.measure import (
    PG_URL,
    Deadline,
    Monitor,
    free_port,
    pg_backend_pids,
    postgres_available,
    recreate_prefect_db,
    say,
    self_cpu,
    session_pids,
    wait_for_quiet,
)
from bench.pipeline import RESULTS
from bench.report import machine
from bench.run import ROOT

MARKDOWN = "\n".join(f"| line {i} | {'x' * 40} | 12.34 |" for i in range(40))  # ~2.5 kB, like a return's page


def measure(db: str, reps: int, work: Path, timeout: float) -> dict[str, Any]:
    """In a fresh process: start a server, time each operation `reps` times (batches of 10 inside a flow)."""
    from entrypoints.prefect_server import prefect_env, start_server, stop_server

    deadline = Deadline(timeout)
    port = free_port()
    os.environ.update(prefect_env(work / "prefect", port))
    if db == "postgres":
        recreate_prefect_db()
        os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = PG_URL
    server = start_server(work / "prefect", port)
    os.environ.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    groups: dict[str, Any] = {"server": lambda: session_pids(server.pid)}
    if db == "postgres":
        groups["pg"] = pg_backend_pids
    mon = Monitor(groups).start()
    try:
        import httpx
        from prefect import flow, task
        from prefect.artifacts import create_markdown_artifact
        from prefect.events import emit_event
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        from entrypoints.prefect_server import drain_prefect_workers
        from tasks.returns import RETRY

        @task(name="noop", timeout_seconds=30, **RETRY)
        def noop() -> None:
            return None

        @flow(name="cost-empty", persist_result=False)
        def empty() -> None:
            return None

        @flow(name="cost-tasks", persist_result=False)
        def tasks10() -> None:
            for _ in range(10):
                noop()

        @flow(name="cost-artifacts", persist_result=False)
        def artifacts10(i: int) -> None:
            for j in range(10):
                create_markdown_artifact(key=f"cost-{i}-{j}", markdown=MARKDOWN, description="cost")

        @flow(name="cost-events", persist_result=False)
        def events10(i: int) -> None:
            for j in range(10):
                emit_event(event="returns.costed", resource={"prefect.resource.id": f"returns.rma.COST{i}",
                                                             "prefect.resource.name": f"COST{i}"},
                           payload={"from": "a", "to": "b", "j": j})

        api = os.environ["PREFECT_API_URL"]
        http = httpx.Client(base_url=api, timeout=30)

        def settle(since: float) -> float:
            """Wait for the server's CPU to fall back to its idle floor; returns the CPU spent since `since`."""
            _, last_busy_mark = mon.until_quiet(idle, 0.04, more=lambda: deadline.left() > 10)
            return sum(last_busy_mark.values()) - since

        def timed(name: str, per_call: int, fn: Any, calls: int) -> dict[str, Any]:
            drain_prefect_workers()
            settle(0)
            m0, c0, t0 = sum(mon.mark().values()), self_cpu(), time.monotonic()
            for i in range(calls):
                fn(i)
                deadline.check(name)
            wall = time.monotonic() - t0
            drain_prefect_workers()
            cpu = self_cpu() - c0
            t_end = time.monotonic()
            spent = settle(m0)
            spent -= idle * (time.monotonic() - 3.0 - t0)  # what the idle floor would have used anyway
            ops = calls * per_call
            row = {"op": name, "ops": ops, "client_wall_ms": round(1000 * wall / ops, 2),
                   "client_cpu_ms": round(1000 * cpu / ops, 2), "server_cpu_ms": round(1000 * spent / ops, 2),
                   "settle_s": round(time.monotonic() - 3.0 - t_end, 1)}
            say(f"{db}: {row}")
            return row

        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            empty()  # warm the engine and the server's caches
            tasks10()
            drain_prefect_workers()
            time.sleep(3)
            idle = sum(mon.idle_rate(5).values())
            flows_n = max(1, reps // 10)
            run = http.post("/flow_runs/filter", json={"limit": 1}).json()[0]["id"]
            rows = [
                timed("flow run (empty, in-process call)", 1, lambda i: empty(), reps),
                timed("flow run + 10 task runs", 1, lambda i: tasks10(), flows_n),
                timed("flow run + 10 artifacts", 1, lambda i: artifacts10(i), flows_n),
                timed("flow run + 10 events", 1, lambda i: events10(i), flows_n),
                timed("GET /flow_runs/{id} (a storefront poll)", 1,
                      lambda i: http.get(f"/flow_runs/{run}").raise_for_status(), reps * 5),
                timed("POST /deployments/get_scheduled_flow_runs (a runner poll)", 1,
                      lambda i: http.post("/deployments/get_scheduled_flow_runs", json={
                          "deployment_ids": ["00000000-0000-0000-0000-000000000001"],
                          "scheduled_before": datetime.now(UTC).isoformat(), "limit": 50}).raise_for_status(),
                      reps * 5),
            ]
        base = rows[0]
        derived = []
        for row, what in ((rows[1], "task run"), (rows[2], "artifact"), (rows[3], "event")):
            derived.append({"op": f"one {what} (minus the flow run, /10)", "ops": row["ops"] * 10, **{
                k: round((row[k] - base[k]) / 10, 2) for k in ("client_wall_ms", "client_cpu_ms", "server_cpu_ms")}})
        return {"prefect_db": db, "idle_server_cores": round(idle, 3), "rows": rows + derived}
    finally:
        mon.stop()
        try:
            from entrypoints.prefect_server import drain_prefect_workers

            drain_prefect_workers()
        except Exception:  # noqa: BLE001
            pass
        stop_server(server)
        if db == "postgres":
            recreate_prefect_db(drop_only=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prefect_costs", description=__doc__.split("\n")[0])
    ap.add_argument("--prefect-db", default="sqlite,postgres")
    ap.add_argument("--reps", type=int, default=100, help="operations per row (default 100)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--quiet-wait", type=float, default=600)
    args = ap.parse_args(argv)
    dbs = [d for d in args.prefect_db.split(",") if d]
    if "postgres" in dbs and not postgres_available():
        dbs.remove("postgres")
    root = Path(tempfile.mkdtemp(prefix="bench-costs-"))
    results = []
    try:
        for db in dbs:
            if args.quiet_wait > 0:
                wait_for_quiet(args.quiet_wait)
            work = root / db
            work.mkdir()
            out = work / "result.json"
            proc = subprocess.Popen([sys.executable, "-m", "bench.prefect_costs", "_child", db, str(args.reps),
                                     str(work), str(args.timeout)], cwd=ROOT, start_new_session=True)
            try:
                proc.wait(timeout=args.timeout + 60)
            except subprocess.TimeoutExpired:
                from bench.measure import stop_group

                stop_group(proc, grace=60)
            if out.exists():
                results.append(json.loads(out.read_text()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"prefect-costs-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    for res in results:
        print(f"\n{res['prefect_db']} (server idle floor {res['idle_server_cores']} cores)\n")
        print("| operation | client wall ms | client CPU ms | server CPU ms |\n|---|---|---|---|")
        for r in res["rows"]:
            print(f"| {r['op']} | {r['client_wall_ms']} | {r['client_cpu_ms']} | {r['server_cpu_ms']} |")
    print(f"\n{path.relative_to(ROOT)}")
    return 0 if len(results) == len(dbs) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        db, reps, work, timeout = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5])
        os.chdir(ROOT)
        Path(work / "result.json").write_text(json.dumps(measure(db, reps, work, timeout)))
        sys.exit(0)
    sys.exit(main())
