"""How the API hands an accepted request to the request stage: as a run of `request-return/storefront` (with a
Prefect API), or by running the stage here (without one, for tests and a laptop). Either way the stage decides."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from adapters.label.layout import label_path
from entrypoints.api.config import RUN_THREADS
from entrypoints.prefect_api import FINAL, PrefectApi, RunFailed
from entrypoints.verbs import DEPLOYMENTS
from service import stages
from service.results import Accepted, Decided
from service.stages import API, LocalSteps
from service.steps import Pipeline

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.context import SettingsContext

log = logging.getLogger(__name__)
HOLDER = f"returns-api:{socket.gethostname()}:{os.getpid()}"  # a request run claimed by the API, in the Prefect UI


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


class RunsHere:
    """Runs a storefront's request run that the API created already claimed (Pending, tagged TAG) on a thread of
    the API's process, up to `threads` at once; a call finding none free waits for one within its own wait, and
    beyond that the run is created Scheduled and the worker runs it."""

    # The storefront waits for this run: a worker costs it a poll and its claim and submission (~0.4 s measured)
    # before the engine starts, and a run created Scheduled and then claimed costs the server a read and a state
    # transition more (~20 ms of its and PostgreSQL's CPU per run, measured: docs/benchmarks.md). The run is still
    # the deployment's run, with its task runs, artifacts and events. Only the call that made the run (201, not an
    # earlier call's run under the same key) runs it. A run this process dies holding, or dies before marking as
    # its own, goes back to the worker when the next API process of the host starts (hand_back_orphans); the
    # returns database's sweep re-drives the request meanwhile if it must.
    TAG = "run-by-storefront-api"
    UNMARKED_AFTER = 60.0  # s: a tagged Pending run with no holder this old was never started by its creator

    def __init__(self, api_url: str, threads: int = 4) -> None:
        self.api_url = api_url
        self._free = threading.BoundedSemaphore(threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="request-run")
        self._flows: dict[str, Flow[..., Any]] = {}
        self._settings: SettingsContext | None = None
        self._client: Any = None
        self._setup = threading.Lock()
        self._running: set[str] = set()
        self.ran = 0  # runs run here (the benchmark reports how many the worker took instead)

    def reserve(self, wait: float = 0.0) -> bool:
        """Hold a thread for a run about to be created, waiting up to `wait` s for one; False if none came free."""
        # A run here frees its thread in under a second, and the worker's path costs the storefront more time and
        # the server more CPU (a poll, a claim and a submission: ~130 ms per run, measured under bench.api); so a
        # call whose storefront is waiting anyway queues for a thread, and only a call that waits for none
        # (wait=0), or finds none in its whole wait, hands the run to the worker.
        return self._free.acquire(timeout=wait) if wait > 0 else self._free.acquire(blocking=False)

    def start(self, run: dict[str, Any]) -> None:
        """Run `run` (as the server answered its creation, Pending) on the reserved thread, in the background."""
        run_id = str(run["id"])
        with self._setup:
            # Two calls with one key at the same instant may both hear 201 (Prefect compares the run's creation
            # time with the call's start); in one process only the first runs it. Across processes the steps'
            # idempotency keeps one return, one label and one email.
            twin = run_id in self._running
            self._running.add(run_id)
        if twin:
            self._free.release()
            return
        try:
            self._pool.submit(self._run_here, run)
        except RuntimeError:  # shutting down: hand it to the worker now rather than at the next start
            with self._setup:
                self._running.discard(run_id)
            self._free.release()
            self._hand_back([UUID(run_id)])

    def release(self) -> None:
        """Give back a reserved thread that got no run."""
        self._free.release()

    def close(self) -> None:
        """Wait for the runs in flight (a stopping API lets them finish, as a stopping worker does)."""
        self._pool.shutdown(wait=True)
        if self._client is not None:
            self._client.__exit__(None, None, None)

    def hand_back_orphans(self, deployment_id: UUID) -> list[UUID]:
        """Runs of the deployment that an API process of this host died holding, or that their creator never
        marked as its own, Scheduled again for the worker; their steps are idempotent, so a run that had begun
        starts over safely."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterDeploymentId,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        _, client = self._ready()
        held = client.read_flow_runs(limit=200, flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING]))))
        now = datetime.now(UTC)
        handed = [run.id for run in held if _orphaned(run.infrastructure_pid) or (
            not run.infrastructure_pid and self.TAG in run.tags and run.state_type == StateType.PENDING
            and run.created is not None and (now - run.created).total_seconds() > self.UNMARKED_AFTER)]
        self._hand_back(handed)
        return handed

    def _hand_back(self, run_ids: list[UUID]) -> None:
        """Schedule the runs again, for the worker to take now."""
        from prefect.states import Scheduled

        _, client = self._ready()
        for run_id in run_ids:
            client.set_flow_run_state(run_id, Scheduled(), force=True)

    def _run_here(self, run: dict[str, Any]) -> None:
        try:
            self._run(run)
        except Exception as exc:  # noqa: BLE001 - the engine recorded what it could; the storefront sees the state
            log.warning("request run %s ended here with %s", run.get("id"), type(exc).__name__)
        finally:
            with self._setup:
                self._running.discard(str(run.get("id")))
            self._free.release()

    def _run(self, run: dict[str, Any]) -> None:
        from prefect.client.schemas.objects import FlowRun

        from entrypoints.worker import run_on_this_thread

        settings, client = self._ready()
        flow_run = FlowRun.model_validate(run)  # as created: reading it back would cost the server a request
        try:
            # Which process holds the run, where a worker writes its own (BaseWorker._mark_flow_run_as_submitted).
            client.update_flow_run(flow_run.id, infrastructure_pid=HOLDER)
            flow = self._flow(client, flow_run.deployment_id)
        except Exception:
            self._hand_back([flow_run.id])  # not started here: the worker's to run
            raise
        flow_run = flow_run.model_copy(update={"infrastructure_pid": HOLDER})
        with self._setup:
            self.ran += 1
        run_on_this_thread(flow, flow_run, settings)

    def _ready(self) -> tuple[SettingsContext, Any]:
        """The settings the runs use and one Prefect client for the claims (a new client costs ~15 ms of CPU)."""
        with self._setup:
            if self._settings is None:
                from prefect.client.orchestration import get_client

                from entrypoints.worker import prepare_run_logging, quiet_settings

                prepare_run_logging()
                self._settings = quiet_settings(self.api_url)
                with self._settings.model_copy():
                    self._client = get_client(sync_client=True).__enter__()
            return self._settings, self._client

    def _flow(self, client: Any, deployment_id: UUID | None) -> Flow[..., Any]:
        """The deployment's flow, imported once (a code change needs a restart, as the worker's does)."""
        from entrypoints.worker import import_flow

        key = str(deployment_id)
        with self._setup:
            if key not in self._flows:
                deployment = client.read_deployment(deployment_id)
                self._flows[key] = import_flow(deployment.entrypoint)
            return self._flows[key]


def _orphaned(holder: str | None) -> bool:
    """Claimed by an API process of this host that no longer runs (another host's, or a reused pid: not known)."""
    prefix, _, rest = (holder or "").partition(":")
    host, _, pid = rest.rpartition(":")
    if prefix != "returns-api" or host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


@dataclass
class ThroughPrefect:
    """A run of the storefront deployment, keyed so that a retried call finds the same run; the decision is read
    from the returns database (the truth) while the run's state is watched, rarely, for a failure."""

    api: PrefectApi
    pipeline: Pipeline
    poll: float = 0.02  # the returns database (a read without a lock): first poll, growing by half to `max_poll`
    max_poll: float = 0.2
    state_every: float = 1.0  # the Prefect API: each read costs its server CPU
    here: RunsHere | None = field(default=None)

    @classmethod
    def over(cls, api: PrefectApi, pipeline: Pipeline, patience: float = 10.0,
             threads: int = RUN_THREADS) -> ThroughPrefect:
        """A submitter on its own client of `api` that gives up on a busy Prefect server after `patience` s (the
        storefront then hears 503 and retries with the same key) instead of holding its call for minutes; it runs
        up to `threads` request runs itself (0: the worker runs them all)."""
        own = PrefectApi(api.api_url, patience=patience)
        own.http.headers.update(api.http.headers)
        return cls(own, pipeline, here=RunsHere(api.api_url, threads) if threads > 0 else None)

    def recover(self) -> None:
        """At start: hand the worker the request runs an earlier API process here died holding."""
        if self.here is not None:
            handed = self.here.hand_back_orphans(UUID(self.api.deployment_id(DEPLOYMENTS["request"])))
            if handed:
                log.warning("%d request run(s) held by a stopped API process went back to the worker", len(handed))

    def close(self) -> None:
        """Let the request runs in flight here finish."""
        if self.here is not None:
            self.here.close()

    def process(self, rma: str, run_key: str) -> None:
        self.api.create_run(DEPLOYMENTS["process"], {"rma": rma, "by": API.name}, idempotency_key=run_key)

    def submit(self, accepted: Accepted, run_key: str, wait: float) -> Decided | None:
        deadline = time.monotonic() + wait
        run_id = accepted.flow_run_id
        if run_id is None:
            parameters = dict(accepted.parameters)
            here = self.here if self.here is not None and self.here.reserve(wait) else None
            try:
                run, made = self.api.new_run(DEPLOYMENTS["request"], parameters, idempotency_key=run_key,
                                             pending=here is not None, tags=[RunsHere.TAG] if here else None,
                                             checked=True)
            except BaseException:
                if here:
                    here.release()
                raise
            run_id = str(run["id"])
            untouched = (run.get("state") or {}).get("type") == "PENDING" and not run.get("infrastructure_pid")
            if here and made and untouched:
                here.start(run)
            elif here:  # an earlier call with this key made the run, and runs it (or ran it)
                here.release()
            self.pipeline.request_started(accepted.reference, run_id)
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
