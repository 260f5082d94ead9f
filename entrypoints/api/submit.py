"""How the API hands an accepted request to the request stage: as a run of `request-return/storefront` (with a
Prefect API), or by running the stage here (without one, for tests and a laptop). Either way the stage decides."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from adapters.label.layout import label_path
from entrypoints.prefect_api import FINAL, PrefectApi, RunFailed
from entrypoints.verbs import DEPLOYMENTS
from service import stages
from service.results import Accepted, Decided
from service.stages import API, LocalSteps
from service.steps import Pipeline


class Submitter(Protocol):
    def submit(self, accepted: Accepted, run_key: str, wait: float) -> Decided | None:
        """Start (or find) the request's stage and wait up to `wait` s: its decision, or None if not yet."""
        ...

    def process(self, rma: str, run_key: str) -> None:
        """Have the process stage ask about the return's refund (once per `run_key`); need not wait for it."""
        ...


def ready(pipeline: Pipeline, decided: Decided | None) -> bool:
    """The stage has done what the storefront waits for: decided and, when authorized, written the label."""
    if decided is None:
        return False
    return not (decided.authorized and decided.rma_number
                and not label_path(pipeline.settings.label_dir, decided.rma_number).exists())


@dataclass
class InProcess:
    """The stage run here with plain steps (no Prefect API configured)."""

    pipeline: Pipeline

    def submit(self, accepted: Accepted, run_key: str, wait: float) -> Decided | None:
        found = self.pipeline.decided_request(accepted)
        if ready(self.pipeline, found):
            return found
        request = self.pipeline.verified_request(accepted.reference, dict(accepted.parameters))
        return stages.after_request(LocalSteps(self.pipeline), request)

    def process(self, rma: str, run_key: str) -> None:
        stages.process(LocalSteps(self.pipeline), rma, API)


@dataclass
class ThroughPrefect:
    """A run of the storefront deployment, keyed so that a retried call finds the same run; the decision is read
    from the returns database (the truth) while the run's state is watched, rarely, for a failure."""

    api: PrefectApi
    pipeline: Pipeline
    poll: float = 0.02  # the returns database (a read without a lock): first poll, growing by half to `max_poll`
    max_poll: float = 0.2
    state_every: float = 1.0  # the Prefect API: each read costs its server CPU

    @classmethod
    def over(cls, api: PrefectApi, pipeline: Pipeline, patience: float = 10.0) -> ThroughPrefect:
        """A submitter on its own client of `api` that gives up on a busy Prefect server after `patience` s (the
        storefront then hears 503 and retries with the same key) instead of holding its call for minutes."""
        own = PrefectApi(api.api_url, patience=patience)
        own.http.headers.update(api.http.headers)
        return cls(own, pipeline)

    def process(self, rma: str, run_key: str) -> None:
        self.api.create_run(DEPLOYMENTS["process"], {"rma": rma, "by": API.name}, idempotency_key=run_key)

    def submit(self, accepted: Accepted, run_key: str, wait: float) -> Decided | None:
        run_id = accepted.flow_run_id
        if run_id is None:
            parameters = dict(accepted.parameters)
            run_id = self.api.create_run(DEPLOYMENTS["request"], parameters, idempotency_key=run_key)
            self.pipeline.request_started(accepted.reference, run_id)
        deadline = time.monotonic() + wait
        next_state = time.monotonic() + self.state_every
        poll = self.poll
        while True:
            found = self.pipeline.decided_request(accepted)
            if ready(self.pipeline, found):
                return found
            now = time.monotonic()
            if now >= next_state or now >= deadline:
                kind, message = self.api.run_state(run_id)
                if kind in FINAL and kind != "COMPLETED":
                    raise RunFailed(f"{kind.lower()}: {message[:300]}")
                next_state = now + self.state_every
            if now >= deadline:
                return None
            time.sleep(min(poll, max(0.0, deadline - now)))
            poll = min(poll * 1.5, self.max_poll)
