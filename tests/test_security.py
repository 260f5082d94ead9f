"""Security: R13 answers alike by message and by code path, nothing personal reaches Prefect (run names, tags,
artifacts, events, logs), logs are redacted, the local Prefect server listens on loopback only, and the pipeline
writes files only under RETURNS_HOME.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import string
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import make_pipeline
from invariants import check_invariants
from sqlalchemy import event, select

from adapters.db import unit_of_work
from adapters.redact import RedactPersonalData, install_redaction, redact
from models.errors import NotFound
from models.schemas import ReceiptIn, ReturnRequestIn, parse
from models.tables import Customer, OutboxMessage
from service.returns import SAME_ANSWER_FOR_R13
from service.steps import Pipeline
from tests.helpers import API, NOW, process, receive, sweep

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample"
LATER = NOW + timedelta(days=3)
REQUESTS = {s["request"]["order_number"]: s["request"]
            for s in json.loads((SAMPLE / "requests.json").read_text("utf-8"))}


# ---- (a) R13: the same answer, by the same road ----------------------------------------------------------------------


def statements(p: Pipeline, body: dict[str, Any], op: str = "request") -> tuple[str, list[str]]:
    """The error a request earns and the SQL statements it ran (text only: the parameters differ, the road must not)."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(p.engine, "before_cursor_execute", record)
    try:
        with pytest.raises(NotFound) as caught:
            if op == "request":
                p.request(parse(ReturnRequestIn, body), NOW, API)
            else:
                p.quote(parse(ReturnRequestIn, body), NOW)
    finally:
        event.remove(p.engine, "before_cursor_execute", record)
    return str(caught.value), seen


@pytest.mark.parametrize("op", ["request", "quote"])
def test_r13_unknown_order_and_wrong_email_take_the_same_code_path(sample_pipeline: Pipeline, op: str) -> None:
    p = sample_pipeline
    good = REQUESTS["IS-1001"]
    unknown_order = statements(p, good | {"order_number": "IS-9999"}, op)
    wrong_email = statements(p, good | {"email": "someone.else@example.com"}, op)
    # another customer's real address on this order: still nothing to learn
    other_customer = statements(p, good | {"email": "renat.garipov@example.com"}, op)
    assert unknown_order[0] == wrong_email[0] == other_customer[0] == SAME_ANSWER_FOR_R13
    assert len(unknown_order[1]) == len(wrong_email[1]) == len(other_customer[1]) > 0
    assert unknown_order[1] == wrong_email[1] == other_customer[1]


# ---- (b) nothing personal in Prefect ---------------------------------------------------------------------------------


def personal_strings(p: Pipeline) -> list[str]:
    """Every customer's name, email, street, postal code (and the parts of names long enough to mean something)."""
    out: list[str] = []
    with unit_of_work(p.engine) as s:
        for c in s.scalars(select(Customer)):
            out += [c.name, c.email, c.email.split("@")[0], c.line1, c.postal_code]
            out += [part for part in c.name.replace("-", " ").split() if len(part) >= 4]
            out += [c.line2] if c.line2 else []
    return out


def assert_no_personal_data(text: str, personal: list[str], where: str) -> None:
    low = text.casefold()
    leaked = [x for x in personal if x.casefold() in low]
    assert not leaked, f"{where} shows personal data: {leaked}"


@pytest.fixture
def lived(sample_pipeline: Pipeline) -> Iterator[tuple[Pipeline, list[str]]]:
    """The sample returns in several states: authorized, declined, review, received then completed, refunded."""
    p = sample_pipeline
    rmas = []
    for order in ("IS-1001", "IS-1002", "IS-1003", "IS-1006", "IS-1011"):
        out = p.request(parse(ReturnRequestIn, REQUESTS[order]), NOW, API)
        if out.rma_number:
            rmas.append(out.rma_number)
    first = rmas[0]
    receive(p, parse(ReceiptIn, {"rma": first, "received_at": LATER.isoformat(), "by": "dock",
                                "lines": [{"sku": "VC-SERUM-30", "unopened": 1}]}), LATER)
    assert process(p, first, LATER, API)
    yield p, rmas


def test_artifacts_events_and_board_carry_ids_not_people(lived: tuple[Pipeline, list[str]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import visibility

    p, rmas = lived
    personal = personal_strings(p)
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(visibility, "create_markdown_artifact", lambda **kw: sent.append({"artifact": kw}))
    monkeypatch.setattr(visibility, "emit_event", lambda **kw: sent.append({"event": kw}))
    for rma in rmas:
        shown = p.show(rma, LATER)
        assert_no_personal_data(visibility.return_markdown(shown), personal, f"artifact of {rma}")
        visibility.publish_return(p, rma)
    board = p.board(LATER)
    assert_no_personal_data(visibility.board_markdown(board, p.policy), personal, "board")
    visibility.publish_board(board, p.policy)
    assert sum("event" in x for x in sent) >= len(rmas) and sum("artifact" in x for x in sent) == len(rmas) + 1
    assert_no_personal_data(json.dumps(sent, default=str), personal, "what publish_* hands to Prefect")


def test_flow_run_names_tags_and_task_names_use_ids_only() -> None:
    import yaml
    from prefect import Flow

    from flows import returns as f

    flows = [v for v in vars(f).values() if isinstance(v, Flow)]
    assert len(flows) >= 6
    allowed = {"order_number", "rma"}
    for fl in flows:
        template = fl.flow_run_name
        assert isinstance(template, str), f"{fl.name}: flow_run_name must be a template of ids"
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        assert fields <= allowed, f"{fl.name}: run name uses {fields - allowed}"
    for spec in yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))["deployments"]:
        assert all("{" not in tag and "@" not in tag for tag in spec["tags"]), spec
    from tasks import returns as t

    for name in dir(t):
        task = getattr(t, name)
        if hasattr(task, "task_run_name"):
            assert task.task_run_name is None or "email" not in str(task.task_run_name)


def test_pipeline_logs_carry_no_personal_data(sample_pipeline: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever the steps log (relay reports, warnings), at every level, names no customer."""
    p = sample_pipeline
    personal = personal_strings(p)
    with caplog.at_level(logging.DEBUG):
        for order in ("IS-1001", "IS-1004", "IS-1006"):
            out = p.request(parse(ReturnRequestIn, REQUESTS[order]), NOW, API)
            if out.state == "authorized":
                p.render_label(out.rma_number)
        with pytest.raises(NotFound):
            p.request(parse(ReturnRequestIn, REQUESTS["IS-1001"] | {"email": "x@example.com"}), NOW, API)
        report = p.relay(LATER)
        sweep(p, NOW + timedelta(days=40))
    assert_no_personal_data("\n".join(r.getMessage() for r in caplog.records), personal, "the logs")
    assert_no_personal_data(json.dumps(report, default=str), personal, "the relay report")
    check_invariants(p, mail_dir=p.settings.mail_dir)


# ---- (c) redaction ---------------------------------------------------------------------------------------------------


def record(msg: Any, args: Any = (), exc: BaseException | None = None) -> logging.LogRecord:
    args = (args,) if isinstance(args, dict) else args  # as logging.info("%(k)s", {...}) passes it
    rec = logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 1, msg, args,
                            (type(exc), exc, exc.__traceback__) if exc else None)
    assert RedactPersonalData().filter(rec) is True
    return rec


def test_redaction_of_emails_and_phones_in_messages_args_and_exceptions() -> None:
    assert record("refund for zoe.lukasiewicz@example.com sent").getMessage() == "refund for <email> sent"
    assert record("mail to %s failed: %s", ("Zoe.L+returns@mail.example.co.uk", "550 no such user")).getMessage() \
        == "mail to <email> failed: 550 no such user"
    assert record("to %(who)s", {"who": "siobhan.om@example.com"}).getMessage() == "to <email>"
    for phone in ("1-855-791-5800", "(561) 555-0123", "+1 561 555 0123", "561.555.0123", "561-555-0123"):
        assert record(f"customer called from {phone} today").getMessage() == "customer called from <phone> today"
        assert record("callback %s", (phone,)).getMessage() == "callback <phone>"
    # an exception object as an argument, and a logged traceback
    assert record("failed: %s", (ValueError("bad recipient bjorn.akesson@example.com"),)).getMessage() \
        == "failed: bad recipient <email>"
    try:
        raise RuntimeError("SMTP said no to chloe.dubois@example.com")
    except RuntimeError as exc:
        rec = record("send failed", exc=exc)
    assert rec.exc_text and "<email>" in rec.exc_text and "chloe" not in rec.exc_text
    assert "chloe" not in logging.Formatter().format(rec)


def test_redaction_leaves_ids_amounts_and_times_alone() -> None:
    for text in ("RMA-7K2QMXP", "order IS-1001", "refund 195.20 to visa 4242", "payment 15 refund:RMA-7K2QMXP:15",
                 "2026-11-20T10:00:00-05:00", "flow run 6f1c2a52-8e0b-4a53-9a55-3d1f0c9e2b71",
                 "12345678-1234-1234-1234-123456789012", "deadline 2026-11-30", "1732100000", "sku PV-SPF50-91",
                 "http://127.0.0.1:4200/api", "3 sent, 0 failed"):
        assert redact(text) == text, text
        assert record("%s", (text,)).getMessage() == text
    assert record("%d returns, %.2f refunded", (3, 12.5)).getMessage() == "3 returns, 12.50 refunded"


def test_install_redaction_covers_root_and_prefect_loggers_and_their_handlers() -> None:
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    targets = [logging.getLogger(n) for n in ("", "prefect", "prefect.flow_runs", "prefect.task_runs")]
    before = {id(t): list(t.filters) for t in targets}
    try:
        flt = install_redaction()
        assert install_redaction() is flt  # idempotent: one filter, installed once
        for t in targets:
            assert sum(isinstance(f, RedactPersonalData) for f in t.filters) == 1, t.name
        assert flt in handler.filters
        # a child logger's record reaches the root handler without passing the root logger's own filters
        logging.getLogger("returns.serve").warning("polling failed for %s at (561) 555-0123",
                                                   "jose.alvarez@example.com")
        assert stream.getvalue().strip() == "polling failed for <email> at <phone>"
    finally:
        root.removeHandler(handler)
        for t in targets:
            t.filters[:] = before[id(t)]


def test_the_worker_the_api_runs_and_the_command_line_install_the_redaction() -> None:
    import inspect

    from adapters.redact import LOGGERS
    from entrypoints import cli, worker
    from entrypoints.api import submit

    # Both places that run flow runs on threads prepare their logging one way, and that way redacts.
    assert "prepare_run_logging()" in inspect.getsource(worker.ReturnsInProcessWorker.setup)
    assert "prepare_run_logging()" in inspect.getsource(submit.RunsHere._ready)
    assert "install_redaction()" in inspect.getsource(cli.main)
    targets = [logging.getLogger(name) for name in LOGGERS]
    before = {id(t): list(t.filters) for t in targets}
    try:
        worker.prepare_run_logging()
        assert all(any(isinstance(f, RedactPersonalData) for f in t.filters) for t in targets)
    finally:
        for t in targets:
            t.filters[:] = before[id(t)]


# ---- (d) the local Prefect server listens on loopback only -----------------------------------------------------------


def test_start_server_binds_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from entrypoints import prefect_server as serve

    started: list[tuple[list[str], dict[str, str]]] = []

    class FakeServer:
        pid, returncode = 0, None

        def __init__(self, args: list[str], env: dict[str, str], **_: Any) -> None:
            started.append((args, env))

        def poll(self) -> None:
            return None

    monkeypatch.setattr(serve.subprocess, "Popen", FakeServer)
    monkeypatch.setattr(serve, "api_healthy", lambda api, timeout=1.0, http=None: True)
    serve.start_server(tmp_path / "prefect", port=4999)
    (args, env), = started
    assert args[1:5] == ["-m", "prefect", "server", "start"]  # on SQLite, Prefect's own CLI
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "4999"
    assert "0.0.0.0" not in " ".join(args) and "::" not in args
    assert env["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    assert env["PREFECT_API_URL"].startswith("http://127.0.0.1:4999/")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


# ---- (e) files only under RETURNS_HOME -------------------------------------------------------------------------------


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_the_demo_sample_writes_only_under_returns_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from adapters.label.layout import label_path
    from entrypoints.demo import run_sample
    from entrypoints.verbs import Direct

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything written relative to the working directory would land here
    # Earlier tests' unreferenced SQLite connections delete their -wal/-shm files when collected: collect them
    # now, or a collection during the sample reads as a change beside this test.
    gc.collect()
    parent_before = tree(tmp_path.parent) - {p for p in tree(tmp_path.parent) if p.startswith(tmp_path.name)}
    p = make_pipeline(home, f"sqlite:///{home / 'returns.db'}")
    final = run_sample(Direct(p), p)
    capsys.readouterr()

    assert list(cwd.iterdir()) == [], "files written to the working directory"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cwd", "home"], "files written beside RETURNS_HOME"
    parent_after = tree(tmp_path.parent) - {p for p in tree(tmp_path.parent) if p.startswith(tmp_path.name)}
    assert parent_after == parent_before, "files written outside the test's folder"
    allowed_top = {"labels", "mail", "returns.db", "returns.db-wal", "returns.db-shm"}
    assert {Path(x).parts[0] for x in tree(home)} <= allowed_top, tree(home)
    labels, mails = list((home / "labels").iterdir()), list((home / "mail").iterdir())
    assert labels and all(x.suffix == ".pdf" and x.parent == home / "labels" for x in labels)
    assert mails and all(x.suffix == ".eml" and x.parent == home / "mail" for x in mails)
    # every label belongs to an issued RMA and sits where label_path() confines it; the email attachments point there
    rmas = {shown["rma_number"] for shown in final.values() if shown["rma_valid_until"]}
    assert {x.stem for x in labels} <= rmas
    for rma in rmas:
        assert label_path(p.settings.label_dir, rma).resolve().parent == (home / "labels").resolve()
    with unit_of_work(p.engine) as s:
        files = [m.context.get("label_file") for m in s.scalars(select(OutboxMessage)) if m.kind == "rma_issued"]
    assert files and all(isinstance(f, str) and not os.path.isabs(f) and (home / f).resolve().is_relative_to(home)
                         and (home / f).exists() for f in files)
    # labels hold a customer's address: readable by the owner only
    assert all(x.stat().st_mode & 0o077 == 0 for x in labels)
    check_invariants(p, mail_dir=p.settings.mail_dir)


def test_label_paths_refuse_anything_but_a_canonical_rma(tmp_path: Path) -> None:
    from adapters.label.layout import label_path

    for bad in ("../../etc/passwd", "RMA-7K2QMXP/../../x", "/etc/passwd", "RMA-7K2QMXP\n", "RMA-\x00AAAAAA", "",
                "rma-7k2qmxp", "RMA-7K2QMXP.pdf"):
        with pytest.raises(ValueError):
            label_path(tmp_path, bad)
    assert not list(tmp_path.iterdir())


def test_the_audit_rows_keep_the_requesters_email_out(sample_pipeline: Pipeline) -> None:
    """The audit row of a request stores the request without the email (the only personal field it has)."""
    from models.tables import Transition

    p = sample_pipeline
    p.request(parse(ReturnRequestIn, REQUESTS["IS-1001"]), NOW, API)
    with unit_of_work(p.engine) as s:
        facts = [t.facts for t in s.scalars(select(Transition))]
    assert_no_personal_data(json.dumps(facts), personal_strings(p), "the audit rows")
