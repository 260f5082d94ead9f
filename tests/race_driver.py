"""One racing process for tests/test_race.py: builds its own pipeline, says `ready`, waits for the go file, then
processes, sweeps or requests, and prints one JSON line of what it saw. Run as a script (not collected by pytest).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["process", "sweep", "request"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--home", required=True)
    ap.add_argument("--go", required=True, help="start when this file exists")
    ap.add_argument("--at", required=True, help="`now` for process/request, `as_of` for sweep")
    ap.add_argument("--name", required=True)
    ap.add_argument("--rmas", default="", help="comma-separated RMAs (process)")
    ap.add_argument("--request", default="", help="a ReturnRequestIn as JSON (request)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from adapters.config import load_settings
    from adapters.db import engine_for
    from models.errors import ReturnsError, StaleState
    from models.schemas import ReturnRequestIn, parse
    from service.returns import Actor
    from service.steps import Pipeline
    from tests.helpers import process, sweep

    p = Pipeline(settings=load_settings({"RETURNS_HOME": args.home, "RETURNS_DATABASE_URL": args.url}),
                 engine=engine_for(args.url))
    with p.engine.connect():
        pass  # open a pooled connection before the start line, so the race is not a connect race
    at = datetime.fromisoformat(args.at)
    actor = Actor(args.name)
    out: dict[str, object] = {"name": args.name, "completed": [], "none": [], "stale": [], "errors": []}
    print("ready", flush=True)
    go = Path(args.go)
    while not go.exists():
        time.sleep(0.002)

    if args.mode == "process":
        rmas = [r for r in args.rmas.split(",") if r]
        random.Random(args.seed).shuffle(rmas)
        for rma in rmas:
            try:
                done = process(p, rma, at, actor)
                (out["completed"] if done is not None else out["none"]).append(rma)  # type: ignore[attr-defined]
            except StaleState:
                out["stale"].append(rma)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on any
                out["errors"].append(f"{rma}: {type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
    elif args.mode == "sweep":
        try:
            out["sweep"] = sweep(p, at).to_json()
        except Exception as exc:  # noqa: BLE001
            out["errors"].append(f"sweep: {type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
    else:
        try:
            out["result"] = p.request(parse(ReturnRequestIn, args.request), at, actor).to_json()
        except ReturnsError as exc:
            out["refused"] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001
            out["errors"].append(f"request: {type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
    print(json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
