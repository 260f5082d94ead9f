"""The storefront API's latency: `python -m bench.api [-n 16] [--clients 1 4 16] [--prefect-db sqlite|postgres]`.

In one run, against one local Prefect server and the worker (entrypoints.orchestrate.orchestrated), at each
number of concurrent storefront clients, p50/p95 of:

  quote         POST /v1/quotes (the decision; nothing written, no Prefect)
  api request   POST /v1/returns to its 201 with the label written (a run of request-return/storefront that
                the API claims and runs on a thread of its own, as `returns serve` does)
  api, worker   the same through an API that leaves every run to the worker (RETURNS_API_RUN_THREADS=0)
  raw request   the same request the way a storefront had to before: POST create_flow_run on Prefect's own REST
                API, then poll the run until it completes
  floor         the request stage in-process with plain steps (no HTTP, no Prefect): the pipeline's own cost

Each request is a P3 full refund on its own order (bench.pipeline.synthetic_catalog). Ratios are taken within the
run (api/raw, api/floor), so a busy machine moves both sides. Results print as a markdown table and go to
bench/results/api-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.measure import PG_DB, PG_URL, Monitor, free_port, pg_backend_pids, recreate_prefect_db, session_pids, summary
from bench.pipeline import RESULTS
from bench.report import code_version, machine
from bench.workload import request_params, synthetic_catalog
from entrypoints.api.config import RUN_THREADS


def timed(calls: list[Any], clients: int) -> list[float]:
    """Run the calls on `clients` threads; each one's wall time in seconds."""

    def one(call: Any) -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, calls))


def clock(obj: Any, name: str, into: dict[str, list[float]]) -> None:
    """Wrap obj.name so that each call's wall time is appended to into[name]."""
    inner = getattr(obj, name)

    def timed_call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            into.setdefault(name, []).append(time.perf_counter() - start)

    setattr(obj, name, timed_call)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=16, help="requests per client count and path (at least 4 x clients)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--quotes", type=int, default=50, help="quotes per client count")
    ap.add_argument("--run-threads", type=int, default=RUN_THREADS,
                    help="request runs the API runs itself (RETURNS_API_RUN_THREADS)")
    ap.add_argument("--prefect-db", choices=["sqlite", "postgres"], default="sqlite",
                    help="the local Prefect server's database (postgres: a fresh database on 127.0.0.1:5432)")
    args = ap.parse_args(argv)
    if args.prefect_db == "postgres":
        recreate_prefect_db()
        os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = PG_URL  # only the server reads it

    base = Path(tempfile.mkdtemp(prefix="returns-bench-api-"))
    os.environ.update({"RETURNS_HOME": str(base / "home"), "RETURNS_DATABASE_URL": f"sqlite:///{base / 'r.db'}",
                       "RETURNS_PREFECT_PORT": str(free_port())})
    os.environ.pop("PREFECT_API_URL", None)
    from adapters.clock import utcnow
    from adapters.db import upgrade
    from entrypoints.api.app import create_app
    from entrypoints.api.config import ApiConfig
    from entrypoints.api.serve import api_thread
    from entrypoints.api.submit import ThroughPrefect
    from entrypoints.orchestrate import orchestrated
    from models.schemas import ImportIn, parse
    from service.steps import Pipeline

    per = {c: max(args.n, 4 * c) for c in args.clients}
    total = sum(per.values()) * 4 + 2  # each path uses its own orders; two warm up
    pipeline = Pipeline.from_env()
    upgrade(pipeline.settings.database_url)
    pipeline.import_data(parse(ImportIn, synthetic_catalog(total, utcnow())))
    tag = f"{utcnow():%H%M%S}"
    orders = iter(range(total))
    rows: list[dict[str, Any]] = []
    config = ApiConfig(secret=b"bench", key_rate=1e6, address_rate=1e6, wait_seconds=30)
    phases: dict[str, list[float]] = {}
    with orchestrated(base / "prefect") as driver:
        submitter = ThroughPrefect.over(driver.api, pipeline, threads=args.run_threads)
        via_worker = ThroughPrefect.over(driver.api, pipeline, threads=0)
        # Where an API request's time goes: the R13 check and store, the run's creation, the waiting.
        clock(pipeline, "accept", phases)
        clock(submitter.api, "create_run", phases)
        clock(submitter, "submit", phases)
        clock(pipeline, "decided_request", phases)
        monitor = cpu_monitor(driver, args.prefect_db)
        with api_thread(create_app(pipeline, submitter, config), "127.0.0.1", free_port()) as url, \
                api_thread(create_app(pipeline, via_worker, config), "127.0.0.1", free_port()) as worker_url:
            run_levels(args, per, driver, pipeline, (url, worker_url), orders, tag, rows, phases, submitter, monitor)
        monitor.stop()
        submitter.close()
    report(rows, args.prefect_db)
    return 0


def cpu_monitor(driver: Any, prefect_db: str) -> Monitor:
    """CPU per process group: the Prefect server, its PostgreSQL backends, the worker, this process (the API, the
    request runs it runs, and the storefront clients)."""
    groups: dict[str, Any] = {"prefect server": lambda: session_pids(driver.server.pid),
                              "worker": lambda: [driver.worker.pid], "api process": lambda: [os.getpid()]}
    if prefect_db == "postgres":
        groups["prefect postgres"] = lambda: pg_backend_pids(PG_DB)
    return Monitor(groups).start()


def settled(monitor: Monitor, before: dict[str, float], idle: float, n: int) -> dict[str, float]:
    """CPU seconds per request of each group since `before`, once the server is back near idle (it records task
    runs and events after the calls return), its idle rate taken off."""
    start = time.monotonic()
    monitor.until_quiet(idle * 1.5, 0.02, ["prefect server"], quiet_for=0.0, more=lambda: time.monotonic() - start < 30)
    now = monitor.mark()
    spent = {g: now[g] - before[g] for g in now}
    spent["prefect server"] -= idle * (time.monotonic() - start)
    return {g: v / n for g, v in spent.items()}


def run_levels(args: Any, per: dict[int, int], driver: Any, pipeline: Any, urls: tuple[str, str], orders: Any,
               tag: str, rows: list[dict[str, Any]], phases: dict[str, list[float]], submitter: Any,
               monitor: Monitor) -> None:
    """Each client count: quotes, then API requests (run by the API, by the worker), raw Prefect requests and the
    floor, each on fresh orders."""
    from adapters.clock import utcnow
    from entrypoints.api.client import Storefront
    from models.schemas import ReturnRequestIn, parse
    from service import stages
    from service.stages import LocalSteps

    key = pipeline.create_api_key("bench", utcnow())
    storefront, via_worker = (Storefront(url, key, timeout=300) for url in urls)
    for client in (storefront, via_worker):  # the first run imports and registers things
        warm = request_params(next(orders), tag)
        client.request(parse(ReturnRequestIn, warm), warm["idempotency_key"])
    quote = parse(ReturnRequestIn, request_params(0, tag))
    time.sleep(3)
    idle = monitor.idle_rate(5)["prefect server"]
    for clients in args.clients:
        q = timed([lambda: storefront.quote(quote)] * args.quotes, clients)

        def api_call(i: int, client: Any = storefront) -> Any:
            params = request_params(i, tag)
            return lambda: client.request(parse(ReturnRequestIn, params), params["idempotency_key"])

        def worker_call(i: int) -> Any:
            return api_call(i, via_worker)

        def raw_call(i: int) -> Any:
            params = request_params(i, tag)
            return lambda: driver.api.run("request-return/storefront", params, f"raw-{params['idempotency_key']}")

        def floor_call(i: int) -> Any:
            req = parse(ReturnRequestIn, request_params(i, tag))
            return lambda: stages.after_request(LocalSteps(pipeline), req)

        measured = {"quote": q}
        for path, make in (("api request", api_call), ("api, worker", worker_call), ("raw request", raw_call),
                           ("floor", floor_call)):
            if path == "api request":
                phases.clear()
                ran = submitter.here.ran
            before = monitor.mark()
            measured[path] = timed([make(next(orders)) for _ in range(per[clients])], clients)
            if path != "floor":
                cpu = settled(monitor, before, idle, per[clients])
                rows.append({"clients": clients, "path": f"  {path}: CPU ms per request",
                             "n": "; ".join(f"{g} {1000 * v:.0f}" for g, v in cpu.items())})
            if path == "api request":
                rows += [{"clients": clients, "path": f"  api: {name}", "n": len(v)} | summary(v)
                         for name, v in phases.items() if name != "decided_request"]
                rows.append({"clients": clients, "path": "  api: database polls per request",
                             "n": len(phases.get("decided_request", [])) / per[clients]})
                rows.append({"clients": clients, "path": "  api: runs the API ran (the rest: the worker)",
                             "n": submitter.here.ran - ran})
        for path, values in measured.items():
            rows.append({"clients": clients, "path": path, "n": len(values)} | summary(values))
        sys.stderr.write(f"[bench.api] {clients} client(s) done\n")


def report(rows: list[dict[str, Any]], prefect_db: str) -> None:
    """The table on stdout, ratios within the run; the rows as JSON under bench/results/."""
    by = {(r["clients"], r["path"]): r for r in rows}
    for r in rows:
        api = by[(r["clients"], "api request")]
        if r["path"] == "api request":
            r["api/worker p50"] = api["p50"] / by[(r["clients"], "api, worker")]["p50"]
            r["api/raw p50"] = api["p50"] / by[(r["clients"], "raw request")]["p50"]
            r["api/floor p50"] = api["p50"] / by[(r["clients"], "floor")]["p50"]
    print("| clients | path | n | p50 ms | p95 ms | api/worker p50 | api/raw p50 | api/floor p50 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratios = [f"{r[k]:.2f}" if k in r else "" for k in ("api/worker p50", "api/raw p50", "api/floor p50")]
        ms = [f"{1000 * r[k]:.0f}" if r.get(k) is not None else "" for k in ("p50", "p95")]
        n = f"{r['n']:.1f}" if isinstance(r["n"], float) else r["n"]
        print(f"| {r['clients']} | {r['path']} | {n} | {ms[0]} | {ms[1]} | {' | '.join(ratios)} |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"api-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps({"code": code_version(), "machine": machine(), "prefect_db": prefect_db, "rows": rows},
                              indent=2, default=str))
    sys.stderr.write(f"[bench.api] wrote {out}\n")


if __name__ == "__main__":
    raise SystemExit(main())
