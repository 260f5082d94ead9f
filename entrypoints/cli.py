"""The `returns` command line: JSON in, JSON out; errors are one line on stderr and change nothing."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adapters.redact import install_redaction
from entrypoints.prefect_api import RunFailed
from models.errors import InvalidInput, NotFound, ReturnsError, TransientError
from models.review import Decision, ReviewReason
from models.rma import parse_rma
from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, Strict, explain, parse

MAX_INPUT_BYTES = 20 * 1024 * 1024
EXIT_INPUT, EXIT_NOT_FOUND, EXIT_TRANSIENT, EXIT_INTERNAL = 2, 3, 75, 70


def _read(source: str) -> str:
    """The JSON text of FILE or - (stdin), bounded in size."""
    if source == "-":
        data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    else:
        try:
            with open(source, "rb") as fh:
                data = fh.read(MAX_INPUT_BYTES + 1)
        except OSError as exc:
            raise InvalidInput(f"cannot read {source}: {exc.strerror}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise InvalidInput(f"input is larger than {MAX_INPUT_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8")
        json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidInput(f"input is not valid JSON: {str(exc).splitlines()[0][:120]}") from None
    return text


def _time(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{name} is not an ISO 8601 time: {text[:40]!r}") from None
    if moment.tzinfo is None:
        raise InvalidInput(f"{name} needs a UTC offset, e.g. 2026-11-26T10:00:00-05:00")
    return moment


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="returns", description="The returns pipeline (JSON in, JSON out).")
    p.add_argument("--now", help="decide as of this ISO time with offset (replays and tests); default: the clock")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    db = sub.add_parser("db", help="database schema")
    db.add_argument("action", choices=["upgrade"])
    for name, hlp in (("import", "load products, customers and orders (idempotent by key)"),
                      ("quote", "decide a return request; writes nothing"),
                      ("request", "decide and store a request; authorized ones get an RMA"),
                      ("receive", "log a parcel at Lantana with per-unit condition")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("file", help="a JSON file, or - for standard input")
    sp = sub.add_parser("process", help="refund (or ship the replacement) and complete a received return")
    sp.add_argument("rma")
    sp.add_argument("--by", help="the operator's name (default: cli)")
    sp = sub.add_parser("sweep", help="expire stale RMAs, escalate due-soon/overdue returns, re-drive stuck ones")
    sp.add_argument("--as-of", help="ISO time with offset; default: now")
    sp = sub.add_parser("show", help="state, timeline, amounts and deadline of a return")
    sp.add_argument("rma")
    sp = sub.add_parser("review", help="an operator settles a return in review")
    sp.add_argument("rma")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--authorize", action="store_true")
    g.add_argument("--decline", action="store_true")
    sp.add_argument("--reason", required=True, choices=[str(r) for r in ReviewReason],
                    help="why (not_eligible and customer_withdrew go with --decline; other needs --note)")
    sp.add_argument("--note", default="")
    sp.add_argument("--by", required=True)
    sp = sub.add_parser("cancel", help="withdraw an authorized return")
    sp.add_argument("rma")
    sp.add_argument("--note", required=True)
    sp.add_argument("--by", required=True)
    sub.add_parser("relay", help="send the pending emails in the outbox")
    sp = sub.add_parser("api-key", help="storefront keys for the API: create prints the key once; revoke")
    sp.add_argument("action", choices=["create", "revoke"])
    sp.add_argument("name", help="the storefront's name, e.g. main-site")
    sp = sub.add_parser("webhook", help="endpoints that get every transition, signed: add prints the secret once")
    sp.add_argument("action", choices=["add", "list", "remove"])
    sp.add_argument("target", nargs="?", help="add: the endpoint URL; remove: its id")
    _desk_parsers(sub)
    sub.add_parser("serve", help="the local Prefect server (unless PREFECT_API_URL answers), the worker and the API")
    sp = sub.add_parser("demo", help="run the sample returns through their whole life")
    sp.add_argument("--exit-when-done", action="store_true", help="exit after the sample instead of serving")
    sp.add_argument("--in-process", action="store_true", help="drive the steps directly, without Prefect")
    return p


def _operator(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 40 or not all(ch.isalnum() or ch in "._ -" for ch in name):
        raise InvalidInput("--by takes an operator name of letters, digits, '.', '_', '-' or spaces (max 40)")
    return name


def _note(text: str) -> str:
    if len(text) > 1000 or any(ord(ch) < 32 for ch in text):
        raise InvalidInput("--note must be at most 1000 printable characters")
    return text


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from adapters.clock import utcnow
    from service.steps import Pipeline

    if args.cmd == "demo":
        from entrypoints.demo import run_demo

        return run_demo(exit_when_done=args.exit_when_done, in_process=args.in_process)
    if args.cmd == "serve":
        from entrypoints.api.serve import run_serve

        return run_serve()
    fixed = _time(args.now, "--now")
    now = fixed or utcnow()
    # Every input is read and validated before the database is touched: a refused command writes nothing,
    # not even a fresh database (nor a flow run).
    schemas: dict[str, type[Strict]] = {"import": ImportIn, "quote": ReturnRequestIn, "request": ReturnRequestIn,
                                           "receive": ReceiptIn}
    payload: Any = parse(schemas[args.cmd], _read(args.file)) if args.cmd in schemas else None
    rma = parse_rma(args.rma) if getattr(args, "rma", None) is not None else None
    note = _note(args.note) if getattr(args, "note", None) is not None else None
    by = _operator(args.by) if getattr(args, "by", None) is not None else None
    as_of = (_time(args.as_of, "--as-of") or now) if args.cmd == "sweep" else now
    if args.cmd in ("api-key", "webhook"):
        from service.storefront import check_url, key_name

        if args.cmd == "api-key":
            key_name(args.name)
        elif args.action == "add" and args.target:
            check_url(args.target)
    desk = _desk(args)
    through_prefect = bool(os.environ.get("PREFECT_API_URL")) and args.cmd in VERBS
    if through_prefect and fixed is not None:
        raise InvalidInput("--now replays a verb here and cannot reach a flow run: unset PREFECT_API_URL to use it")
    pipeline = Pipeline.from_env()
    if args.cmd == "db":
        from adapters.db import upgrade

        upgrade(pipeline.settings.database_url)
        _print({"upgraded": True})
        return 0
    ensure_schema(pipeline)
    if desk is not None:
        desk(pipeline, now)
        return 0
    if args.cmd == "import":
        _print(pipeline.import_data(payload).as_dict())
        return 0
    if args.cmd == "quote":
        _print(pipeline.quote(payload, now))
        return 0
    if args.cmd == "show":
        assert rma is not None  # argparse requires it
        _print(pipeline.show(rma, now))
        return 0
    if args.cmd in ("api-key", "webhook"):
        _print(_storefront_admin(pipeline, args, now))
        return 0
    verbs = _verbs(pipeline, through_prefect, fixed)
    calls: dict[str, Callable[[], Any]] = {
        "request": lambda: verbs.request(payload),
        "receive": lambda: verbs.receive(payload),
        "process": lambda: verbs.process(rma, by or "cli"),
        "review": lambda: verbs.review(rma, Decision.AUTHORIZE if args.authorize else Decision.DECLINE,
                                       ReviewReason(args.reason), note, by),
        "cancel": lambda: verbs.cancel(rma, note, by),
        "sweep": lambda: verbs.sweep(as_of),
        "relay": lambda: verbs.relay(),
    }
    _print(calls[args.cmd]())
    return 0


def _desk_parsers(sub: Any) -> None:
    sp = sub.add_parser("what-if", help="replay a candidate policy over the stored requests; writes nothing")
    sp.add_argument("file", help='a JSON object of policy numbers, e.g. {"full_refund_days": 45}, or - for stdin')
    sp.add_argument("--since", help="first request date replayed, YYYY-MM-DD (default: the first request)")
    sp.add_argument("--until", help="last request date replayed, YYYY-MM-DD (default: today)")
    sp = sub.add_parser("export", help="the returns requested in a period as CSV: ids, dates, decisions, amounts")
    sp.add_argument("--since", required=True, help="first request date, YYYY-MM-DD (shop's time zone)")
    sp.add_argument("--until", required=True, help="last request date, YYYY-MM-DD")


def _desk(args: argparse.Namespace) -> Callable[[Any, datetime], None] | None:
    """`what-if` and `export`, their input checked before anything is opened; both only read the database and run
    here (no flow run), the same implementation the policy-what-if deployment runs."""
    if args.cmd not in ("what-if", "export"):
        return None
    from models.whatif import Period, PolicyChangesIn, parse_day, refuse_unreplayed

    period = Period(parse_day(args.since, "--since"), parse_day(args.until, "--until"))
    if args.cmd == "export":
        def export(pipeline: Any, now: datetime) -> None:
            from service.report import export_csv

            sys.stdout.write(export_csv(pipeline.engine, pipeline.policy, period))

        return export
    text = _read(args.file)
    refuse_unreplayed(json.loads(text))
    changes = parse(PolicyChangesIn, text)

    def replay(pipeline: Any, now: datetime) -> None:
        from service.whatif import what_if

        _print(what_if(pipeline.engine, pipeline.policy, changes, period, now).to_json())

    return replay


def _storefront_admin(pipeline: Any, args: argparse.Namespace, now: datetime) -> Any:
    """`api-key create|revoke NAME` and `webhook add URL|list|remove ID`: keys and secrets are printed only here."""
    if args.cmd == "api-key":
        if args.action == "create":
            return {"name": args.name, "key": pipeline.create_api_key(args.name, now)}
        pipeline.revoke_api_key(args.name, now)
        return {"name": args.name, "revoked": True}
    if args.action == "list":
        return pipeline.webhooks()
    if not args.target:
        raise InvalidInput(f"webhook {args.action} needs {'the URL' if args.action == 'add' else 'the id'}")
    if args.action == "add":
        return pipeline.add_webhook(args.target, now)
    if not args.target.isdigit():
        raise InvalidInput("webhook remove takes the endpoint's id (see `returns webhook list`)")
    pipeline.remove_webhook(int(args.target), now)
    return {"id": int(args.target), "removed": True}


VERBS = frozenset({"request", "receive", "process", "review", "cancel", "sweep", "relay"})


def _verbs(pipeline: Any, through_prefect: bool, fixed: datetime | None) -> Any:
    """The verbs through the configured Prefect API (a run of each verb's deployment), else run here."""
    if through_prefect:
        from entrypoints.prefect_api import PrefectApi
        from entrypoints.verbs import ThroughPrefect

        return ThroughPrefect(PrefectApi(os.environ["PREFECT_API_URL"], os.environ.get("PREFECT_API_AUTH_STRING")),
                              pipeline)
    from entrypoints.verbs import Direct

    return Direct(pipeline, (lambda: fixed) if fixed is not None else Direct.clock)


def ensure_schema(pipeline: Any) -> None:
    """Apply migrations on first use of a fresh database, so the embedded default needs no set-up step."""
    from sqlalchemy import inspect

    if not inspect(pipeline.engine).has_table("alembic_version"):
        from adapters.db import upgrade

        upgrade(pipeline.settings.database_url)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit 0 on success, 2 bad input, 3 not found, 75 try again, 70 internal error."""
    install_redaction()
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        return _fail(f"invalid input: {explain(exc)}", EXIT_INPUT)
    except NotFound as exc:
        return _fail(str(exc), EXIT_NOT_FOUND)
    except RunFailed as exc:
        return _fail(str(exc), _run_exit_code(str(exc)))
    except TransientError as exc:
        return _fail(f"temporarily unavailable, try again: {exc}", EXIT_TRANSIENT)
    except ReturnsError as exc:
        return _fail(str(exc), EXIT_INPUT)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback reaches a user
        _log_internal(exc)
        return _fail(f"internal error ({type(exc).__name__}); details in the log under RETURNS_HOME", EXIT_INTERNAL)


def _run_exit_code(message: str) -> int:
    """The exit code the verb would have had run here, from the error class the failed run's state names."""
    for names, code in ((("NotFound",), EXIT_NOT_FOUND),
                        (("TransientError", "StaleState", "Unavailable", "TimeoutError"), EXIT_TRANSIENT)):
        if any(f"{name}:" in message or f"{name}(" in message for name in names):
            return code
    return EXIT_INPUT


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"returns: error: {message}\n")
    return code


def _log_internal(exc: BaseException) -> None:
    import traceback

    try:
        from adapters.config import settings

        log = Path(settings().home) / "logs" / "errors.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"--- {datetime.now().isoformat()}\n{''.join(traceback.format_exception(exc))}\n")
    except OSError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
