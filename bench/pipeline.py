"""Time whole returns through the pipeline three ways: `python -m bench.pipeline [-n 100 1000] [--modes ...]`.

Every return is a P3 full refund (unwanted, unopened, bought 5 days ago) that is authorized, gets its RMA, label
PDF and "RMA issued" email, is received unopened at Lantana, refunded, and gets its "received" and "processed"
emails. The three modes (bench/modes.py) run the same stage functions: the floor with plain steps, the flows
in-process under a Prefect server, the served deployments through a worker, driven over REST, and `api`: the
requests through the storefront API (which runs each request run itself), the receipts as `served`.

Each (mode, Prefect database, N) runs in its own subprocess (Prefect settings are per process) with a fresh
RETURNS_HOME and SQLite returns database under a temp dir, a fresh Prefect home and, for PostgreSQL, a freshly
created `prefect_bench` database. CPU and peak RSS come from /proc (client: getrusage of the bench process;
worker: the worker's process group; server: the `prefect server start` process tree; pg: the PostgreSQL backends
of `prefect_bench`). Results print as a markdown table and are written to bench/results/<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.measure import postgres_available, say, stop_group, wait_for_quiet
from bench.report import code_version, machine, table
from bench.run import ROOT, Run
from entrypoints.prefect_server import WORKER_POLL_SECONDS

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("floor", "flows", "served", "api")


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


def profiled_server_main(out: str, argv: list[str]) -> int:
    """`prefect <argv>` under cProfile, as start_server runs it; the profile is written when the server shuts down
    (SIGTERM)."""
    import cProfile

    from entrypoints.prefect_server import server_command, stdlib_timestamps

    if server_command(dict(os.environ)) == "entrypoints.prefect_server":
        stdlib_timestamps()

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
        stop_group(proc, grace=60)  # the child stops its servers on SIGTERM
        _kill_leftovers(work / "pgids.txt")
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        proc.wait(timeout=timeout + 60)  # the child enforces `timeout` itself; this is the backstop
    except subprocess.TimeoutExpired:
        say(f"{spec['label']}: over time, stopping it")
        stop_group(proc, grace=60)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, nargs="+", default=[100, 1000], help="returns per run (default 100 1000)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of floor,flows,served,api")
    ap.add_argument("--prefect-db", default="sqlite,postgres",
                    help="comma list of sqlite,postgres (postgres skipped when 127.0.0.1:5432 does not answer)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent storefront clients in `served` (default 4)")
    ap.add_argument("--poll", type=float, default=0.05, help="client poll period for a run's state, s")
    ap.add_argument("--dock-waits-on", choices=("prefect", "database"), default="prefect",
                    help="how a dock learns its receipt is done: polling its run every --poll s, as the first "
                         "build's bench did (default), or reading the returns database")
    ap.add_argument("--worker-poll", type=float, default=WORKER_POLL_SECONDS,
                    help=f"the worker's timed poll for scheduled runs, s (default {WORKER_POLL_SECONDS:g}, as "
                         "`returns serve`; it also polls when a run is scheduled)")
    ap.add_argument("--workers", type=int, default=4, help="flow runs the worker runs at once (its --limit, default 4)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is stopped")
    ap.add_argument("--budget", type=float, default=900,
                    help="a Prefect run predicted (from the same mode at a smaller N) to take longer than this many "
                         "seconds runs with --fallback-n returns instead (default 900)")
    ap.add_argument("--fallback-n", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="cProfile the client and the Prefect server")
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
            work = root / label
            work.mkdir(parents=True)
            spec = {"mode": mode, "prefect_db": db, "n": run_n, "clients": args.clients, "poll": args.poll,
                    "dock_waits_on": args.dock_waits_on,
                    "worker_poll": args.worker_poll, "workers": args.workers, "timeout": args.timeout,
                    "workdir": str(work), "result_path": str(work / "result.json"),
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


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2]))
    if len(sys.argv) > 2 and sys.argv[1] == "_profiled_server":
        sys.exit(profiled_server_main(sys.argv[2], sys.argv[3:]))
    sys.exit(main())
