"""The operator's and storefront's verbs (request, receive, process, review, cancel, sweep, relay), two ways:
`Direct` runs the stages here; `ThroughPrefect` creates a run of the verb's deployment, waits for it, and reads what
it did back from the returns database (the truth) or from the run's report artifact. Both answer the same JSON."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from adapters.clock import utcnow
from entrypoints.prefect_api import PrefectApi
from models.errors import InvalidInput
from models.review import Decision, ReviewReason, review_note
from models.schemas import ReceiptIn, ReturnRequestIn
from service import stages
from service.relay import RelayReport
from service.results import Completed, Decided, Moved, SweepReport
from service.returns import Actor
from service.stages import LocalSteps
from service.steps import Pipeline

# Deployments (prefect.yaml) by verb.
DEPLOYMENTS = {
    "request": "request-return/storefront",
    "receive": "record-receipt/lantana-dock",
    "process": "process-return/operator",
    "review": "settle-review/operator",
    "cancel": "cancel-return/operator",
    "sweep": "deadline-sweep/hourly",
    "relay": "outbox-relay/every-minute",
}


def not_waiting(rma: str) -> InvalidInput:
    return InvalidInput(f"{rma} is not waiting to be processed (see `returns show {rma}`)")


class Verbs(Protocol):
    """Each verb answers its JSON; per-return verbs add the return's email counts."""

    def request(self, req: ReturnRequestIn) -> dict[str, Any]: ...
    def receive(self, receipt: ReceiptIn) -> dict[str, Any]: ...
    def process(self, rma: str, by: str) -> dict[str, Any]: ...
    def review(self, rma: str, decision: Decision, reason: ReviewReason, note: str, by: str) -> dict[str, Any]: ...
    def cancel(self, rma: str, note: str, by: str) -> dict[str, Any]: ...
    def sweep(self, as_of: datetime) -> dict[str, Any]: ...
    def relay(self) -> dict[str, Any]: ...


def _answer(pipeline: Pipeline, out: Decided | Moved | Completed) -> dict[str, Any]:
    # The stages hand the id on; only an outcome read back from the database (through Prefect) lacks it.
    return_id = out.return_id if out.return_id is not None else pipeline.return_id(str(out.rma_number))
    return out.to_json() | {"emails": pipeline.emails_of(return_id)}


def _swept(pipeline: Pipeline, report: SweepReport) -> dict[str, Any]:
    return report.to_json() | {"board": pipeline.board(report.as_of).to_json()}


@dataclass
class Direct:
    """The verbs run here, on the stages with plain steps (no Prefect API configured)."""

    pipeline: Pipeline
    clock: Callable[[], datetime] = utcnow

    @property
    def steps(self) -> LocalSteps:
        return LocalSteps(self.pipeline, self.clock)

    def request(self, req: ReturnRequestIn) -> dict[str, Any]:
        return _answer(self.pipeline, stages.after_request(self.steps, req))

    def receive(self, receipt: ReceiptIn) -> dict[str, Any]:
        return _answer(self.pipeline, stages.after_receipt(self.steps, receipt))

    def process(self, rma: str, by: str) -> dict[str, Any]:
        out = stages.process(self.steps, rma, Actor.operator(by))
        if out is None:
            raise not_waiting(rma)
        return _answer(self.pipeline, out)

    def review(self, rma: str, decision: Decision, reason: ReviewReason, note: str, by: str) -> dict[str, Any]:
        return _answer(self.pipeline, stages.after_review(self.steps, rma, decision is Decision.AUTHORIZE,
                                                          review_note(decision, reason, note), Actor.operator(by)))

    def cancel(self, rma: str, note: str, by: str) -> dict[str, Any]:
        return _answer(self.pipeline, stages.after_cancel(self.steps, rma, note, Actor.operator(by)))

    def sweep(self, as_of: datetime) -> dict[str, Any]:
        return _swept(self.pipeline, stages.sweep(self.steps, as_of))

    def relay(self) -> dict[str, Any]:
        return self.pipeline.relay(self.clock()).to_json()


@dataclass
class ThroughPrefect:
    """The verbs as runs of their deployments, so a shell operator shows up in the Prefect UI as a form user does."""

    api: PrefectApi
    pipeline: Pipeline

    def request(self, req: ReturnRequestIn) -> dict[str, Any]:
        # Ownership (R13) is checked here and the request stored with its email; the run gets its reference only,
        # so no address reaches the run's parameters, name, logs or events (as on the storefront API's path).
        key = req.idempotency_key or f"once-{uuid.uuid4().hex}"
        accepted = self.pipeline.accept(None, f"cli:{key}", req, utcnow())
        run_id = accepted.flow_run_id or self.api.run(
            DEPLOYMENTS["request"], dict(accepted.parameters), f"request:{req.order_number}:{key}")
        if accepted.flow_run_id is None:
            self.pipeline.request_started(accepted.reference, run_id)
        else:
            self.api.wait(run_id)
        found = self.pipeline.decided_request(accepted)
        if found is None:  # pragma: no cover - a completed request run has stored its return
            raise InvalidInput(f"flow run {run_id} completed without storing the request")
        replayed = accepted.replayed or not self.pipeline.made_in_run(found.return_id, run_id)
        return _answer(self.pipeline, replace(found, replayed=replayed))

    def _moved(self, deployment: str, rma: str, parameters: dict[str, Any]) -> dict[str, Any]:
        self.api.run(DEPLOYMENTS[deployment], parameters)
        return _answer(self.pipeline, self.pipeline.outcome(rma))

    def receive(self, receipt: ReceiptIn) -> dict[str, Any]:
        return self._moved("receive", receipt.rma, receipt.model_dump(mode="json"))

    def process(self, rma: str, by: str) -> dict[str, Any]:
        run_id = self.api.run(DEPLOYMENTS["process"], {"rma": rma, "by": by})
        if not self.pipeline.completed_by(rma, run_id):
            raise not_waiting(rma)
        return _answer(self.pipeline, self.pipeline.outcome(rma))

    def review(self, rma: str, decision: Decision, reason: ReviewReason, note: str, by: str) -> dict[str, Any]:
        review_note(decision, reason, note)  # refused here, before a run is made for it
        return self._moved("review", rma, {"rma": rma, "decision": str(decision), "reason": str(reason),
                                           "note": note, "by": by})

    def cancel(self, rma: str, note: str, by: str) -> dict[str, Any]:
        return self._moved("cancel", rma, {"rma": rma, "note": note, "by": by})

    def sweep(self, as_of: datetime) -> dict[str, Any]:
        from tasks.returns import SWEEP_REPORT

        run_id = self.api.run(DEPLOYMENTS["sweep"], {"as_of": as_of.isoformat()})
        rows = [r for r in self.api.table_artifact(run_id, SWEEP_REPORT) if r.get("action") != "none"]
        return _swept(self.pipeline, SweepReport.from_rows(as_of, rows))

    def relay(self) -> dict[str, Any]:
        from tasks.returns import RELAY_REPORT

        run_id = self.api.run(DEPLOYMENTS["relay"], {})
        return RelayReport.from_rows(self.api.table_artifact(run_id, RELAY_REPORT)).to_json()
