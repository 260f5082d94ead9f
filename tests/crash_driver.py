"""Runs pipeline stages in a process of its own, so the crash suite can SIGKILL it at a named crash point.

    python -m tests.crash_driver '<json list of ops>'

Environment: RETURNS_HOME, RETURNS_DATABASE_URL (the pipeline's), RETURNS_CRASH_AT (the crash point, optional),
and for the `flow-*` ops PREFECT_HOME / PREFECT_API_URL (a real Prefect server the test started).

Each op is a dict with "op" and its arguments; times are ISO strings. The bare ops drive service.steps.Pipeline
the way the command line and the demo do (one stage = the steps a caller runs in a row); the `flow-*` ops run the
Prefect flows of flows/returns.py. Every op's result is printed as one JSON line, so a surviving run can be read.
The test process imports `run_op` to set up and resume with exactly the same code.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from models.schemas import ImportIn, ReceiptIn, ReturnRequestIn, parse
from service import stages
from service.results import SweepReport
from service.returns import Actor
from service.stages import LocalSteps
from service.steps import Pipeline

SAMPLE = Path(__file__).resolve().parent.parent / "sample"
REQUESTS: dict[str, dict[str, Any]] = {
    s["request"]["order_number"]: s["request"] for s in json.loads((SAMPLE / "requests.json").read_text("utf-8"))
}


def request_for(order: str, **changes: Any) -> ReturnRequestIn:
    """The sample request for `order`, with an idempotency key (so a re-run replays it) unless one is given."""
    body = REQUESTS[order] | {"idempotency_key": f"crash-{order}"} | changes
    return parse(ReturnRequestIn, body)


def receipt_for(rma: str, lines: list[dict[str, Any]], at: str) -> ReceiptIn:
    return parse(ReceiptIn, {"rma": rma, "received_at": at, "lines": lines, "by": "dock"})


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text)


@dataclass
class Partial(LocalSteps):
    """The stages' plain steps, less the label or the emails when an op says its caller never got that far."""

    label: bool = True
    mail: bool = True

    def render_label(self, rma: str) -> str | None:
        return super().render_label(rma) if self.label else None

    def notify(self, rma: str | None, return_id: int | None = None) -> None:
        if self.mail:
            super().notify(rma, return_id)

    def report_sweep(self, report: SweepReport) -> None:
        if self.mail:
            super().report_sweep(report)


def run_op(p: Pipeline, op: dict[str, Any]) -> Any:
    """One stage, as its caller runs it (and no more), answering JSON: the unit the crash suite kills and resumes."""
    kind = op["op"]
    now = _t(op.get("now") or op.get("as_of") or "2000-01-01T00:00:00+00:00")
    steps = Partial(p, lambda: now, label=op.get("label", True), mail=op.get("relay", True))
    if kind == "import":
        return p.import_data(parse(ImportIn, op["data"])).as_dict()
    if kind == "request":  # storefront: decide + store, then the label, then the emails
        return stages.after_request(steps, request_for(op["order"], **op.get("changes", {}))).to_json()
    if kind == "receive":  # the dock: receipt, then processing at once, then the emails
        receipt = receipt_for(op["rma"], op["lines"], op.get("received_at", op["now"]))
        if not op.get("process", True):
            out = p.receive(receipt, now, Actor.operator(receipt.by))
            steps.notify(out.rma_number)
            return out.to_json()
        return stages.after_receipt(steps, receipt).to_json()
    if kind == "process":  # an operator processes a received return
        done = stages.process(steps, op["rma"], Actor("api"))
        return done.to_json() if done else None
    if kind == "review":  # an operator settles a review; after receipt that finishes the refund
        return stages.after_review(steps, op["rma"], op.get("authorize", True), "checked", Actor.operator("ops")
                                   ).to_json()
    if kind == "sweep":
        return stages.sweep(steps, now).to_json()
    if kind == "relay":
        return p.relay(now).to_json()
    if kind == "claim":
        return p.claim(op["rma"], now, Actor("api"))
    if kind.startswith("flow-"):
        return _run_flow(op)
    raise ValueError(f"unknown op {kind}")


def _run_flow(op: dict[str, Any]) -> Any:
    """A stage flow under the Prefect server at PREFECT_API_URL, heartbeats off (each one costs a run ~1 s)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows import returns as f
    from tasks import returns as t

    if op.get("clock_offset_minutes"):  # the flows and tasks read the one clock by name: move both past a lease
        offset = timedelta(minutes=op["clock_offset_minutes"])
        real_now = t.utcnow
        for module in (f, t):
            module.utcnow = lambda: real_now() + offset  # type: ignore[attr-defined]
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        if op["op"] == "flow-request":
            req = REQUESTS[op["order"]] | {"idempotency_key": f"crash-{op['order']}"}
            return f.request_return(**{k: v for k, v in req.items() if k != "resolution"})
        if op["op"] == "flow-receipt":
            return f.record_receipt(rma=op["rma"], received_at=_t(op["received_at"]), lines=op["lines"], by="dock")
        if op["op"] == "flow-sweep":
            return f.deadline_sweep(as_of=_t(op["as_of"]) if op.get("as_of") else None)
        if op["op"] == "flow-relay":
            return f.outbox_relay()
    raise ValueError(f"unknown flow op {op['op']}")


def main(argv: list[str]) -> int:
    ops = json.loads(argv[1])
    p = Pipeline.from_env()
    for op in ops:
        out = run_op(p, op)
        sys.stdout.write(json.dumps({"op": op["op"], "out": out}, default=str) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
