"""The `returns-in-process` worker type: Prefect's worker, running each flow run on a thread of its own process."""

# Started with `prefect worker start --pool returns --type returns-in-process` (found through the
# `prefect.collections` entry point in pyproject.toml). Polling, the Pending claim, `--limit` and the pool's and
# queues' concurrency limits, worker heartbeats, cancellation of runs not yet started, events and the Work Pools
# page are Prefect's BaseWorker; this class only says how a claimed run executes: with Prefect's engine
# (`run_flow`) on a thread, where ProcessWorker starts a subprocess per run (measured here: Pending -> Running
# ~0.4 s in-process, ~7 s for the process worker on the same 2-core machine).

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
from prefect.exceptions import InfrastructureNotAvailable, InfrastructureNotFound
from prefect.states import Cancelled
from prefect.workers.base import BaseJobConfiguration, BaseWorker, BaseWorkerResult
from pydantic import BaseModel, Field

from adapters.redact import install_redaction

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.schemas.objects import FlowRun, State
    from prefect.context import SettingsContext, SyncClientContext

DEFAULT_LIMIT = 4  # flow-run threads when `--limit` is not given: threads share one process and one database
SCHEDULED = "prefect.flow-run.Scheduled"  # the server's event for a run created (or rescheduled) on a pool
_ON_OUR_THREAD = contextvars.ContextVar("returns_flow_run_on_our_thread", default=False)


class InProcessVariables(BaseModel):
    """What a deployment may set for this worker type (env and command cannot apply to a thread)."""

    name: str | None = Field(default=None, description="Name of the flow run's infrastructure in events.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels on the flow run's events.")


class InProcessResult(BaseWorkerResult):
    """How a flow run's thread ended: 0 once the engine has recorded a final state."""


class _ThreadTimeoutNotice(logging.Filter):
    """Drop Prefect's per-task notice that a timeout cannot interrupt a worker thread."""

    # Every run here is on one, and the timeouts that bite are the I/O clients' own (SMTP 10 s, SQLite busy 30 s,
    # PostgreSQL connect).

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout of")


def _module_entrypoint(entrypoint: str) -> str:
    """`flows/returns.py:request_return` as `flows.returns:request_return`; other forms unchanged."""
    path, _, name = entrypoint.rpartition(":")
    if path.endswith(".py") and not Path(path).is_absolute():
        return f"{Path(path).with_suffix('').as_posix().replace('/', '.')}:{name}"
    return entrypoint


def quiet_settings(api_url: str | None = None) -> SettingsContext:
    """Prefect's settings as the environment now says, heartbeats off (and the API at `api_url`, when given)."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, Settings

    # Flow-run heartbeats cost ~1 s per run (the engine joins the heartbeat thread); the returns database, not the
    # heartbeat, re-drives a crashed run (the sweep's lease). Read afresh, not copied from the settings of import
    # time: the API's process sets the local server's environment after importing Prefect. Built once per process
    # (~50 ms).
    updates: dict[Any, Any] = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if api_url:
        updates[PREFECT_API_URL] = api_url
    return SettingsContext(profile=get_settings_context().profile,
                           settings=Settings().copy_with_update(updates=updates))


def prepare_run_logging() -> None:
    """Before running flow runs on threads of this process: redact their logs, drop the thread-timeout notice."""
    # Prefect ships run logs to its API and UI: no email addresses or phone numbers in them.
    install_redaction()
    task_runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _ThreadTimeoutNotice) for f in task_runs.filters):
        task_runs.addFilter(_ThreadTimeoutNotice())


_loading = threading.Lock()  # Prefect's import_object is not thread safe


def import_flow(entrypoint: str) -> Flow[..., Any]:
    """A deployment's flow from its entrypoint, imported as a module of this process."""
    from prefect.flows import load_flow_from_entrypoint

    # A script load would execute flows/returns.py a second time, beside `flows.returns`.
    with _loading:
        return load_flow_from_entrypoint(_module_entrypoint(entrypoint), use_placeholder_flow=False)


def run_on_this_thread(flow: Flow[..., Any], flow_run: FlowRun, settings: SettingsContext) -> State[Any]:
    """Run a claimed (Pending) flow run with Prefect's engine on the calling thread; its final state."""
    from prefect.flow_engine import run_flow

    guard_suspension_observer()
    marked = _ON_OUR_THREAD.set(True)
    try:
        # One context per thread and run: an entered one cannot be shared.
        with settings.model_copy(), _thread_client(settings).model_copy():
            # The parameters handed in, not bound by run_flow beforehand: an unknown key (which the API's schema
            # check lets through) then fails the run with a message naming it, instead of raising before the engine
            # has a state to record it in (a process worker's run crashes there).
            return run_flow(flow, flow_run=flow_run, parameters=flow_run.parameters,  # type: ignore[return-value]
                            return_type="state")
    finally:
        _ON_OUR_THREAD.reset(marked)


_kept = threading.local()


def _thread_client(settings: SettingsContext) -> SyncClientContext:
    """This thread's Prefect client context for `settings`' API, its client open for every run on the thread."""
    # The engine takes the client of an entered SyncClientContext and builds one only when there is none: a new
    # client per run cost ~15-25 ms of CPU, most of it loading the CA bundle into a fresh SSL context
    # (ssl.create_default_context, even for http://), measured with py-spy in the API's run threads
    # (docs/benchmarks.md). A copy entered per run sets the context and leaves the kept client open (its client
    # is re-entrant); the connection to the server is reused too.
    from prefect.context import SyncClientContext

    api = settings.settings.api.url
    kept: SyncClientContext | None = getattr(_kept, "client", None)
    if kept is None or getattr(_kept, "api", None) != api:
        with settings.model_copy():
            kept = SyncClientContext()
            kept.client.__enter__()  # held open for the thread's life; its sockets close with it
        _kept.client, _kept.api = kept, api
    return kept


_guarding = threading.Lock()
_OBSERVER = "observe_flow_run_suspension"  # the name prefect.flow_engine calls it by


def guard_suspension_observer() -> bool:
    """Prefect's engine skips its per-run suspension observer for runs on our threads; True once guarded."""
    # For every run of a deployment, Prefect 3.9's engine (flow_engine.setup_flow_run_suspension_request) starts a
    # thread with its own event loop, API client and events websocket, and waits for it to subscribe, so that a
    # `suspend` sent from outside can reach the run. A run on one of our threads can be neither suspended nor
    # interrupted (see kill_infrastructure), and no flow of ours suspends. Measured (docs/benchmarks.md): the
    # observer cost ~88 ms of server CPU and ~60 ms of the runner's per run, and sat on the request's critical path.
    # Prefect has no setting for it, so this wraps the one name the engine calls; other runs in the process (tests'
    # flows) keep it. If a Prefect upgrade renames it, nothing is wrapped and runs keep the observer (a test says so).
    import prefect.flow_engine as engine

    with _guarding:
        observe = getattr(engine, _OBSERVER, None)
        if observe is None:
            return False
        if getattr(observe, "__returns_guarded__", False):
            return True

        @contextmanager
        def observe_unless_ours(*args: Any, **kwargs: Any) -> Iterator[None]:
            if _ON_OUR_THREAD.get():
                yield
                return
            with observe(*args, **kwargs):
                yield

        observe_unless_ours.__returns_guarded__ = True  # type: ignore[attr-defined]
        setattr(engine, _OBSERVER, observe_unless_ours)
        return True


class ReturnsInProcessWorker(BaseWorker[BaseJobConfiguration, Any, InProcessResult]):
    type = "returns-in-process"
    job_configuration = BaseJobConfiguration
    job_configuration_variables = InProcessVariables
    _description = ("Runs each flow run on a thread of the worker's own process with Prefect's engine: no "
                    "subprocess per run. Code changes need a worker restart.")
    _display_name = "Returns in-process"

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        template = super().get_default_base_job_template()
        for key in ("command", "env"):  # a thread runs with the worker's environment and no command line
            template["job_configuration"].pop(key)
        return template

    def __init__(self, *args: Any, limit: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, limit=limit or DEFAULT_LIMIT, **kwargs)  # type: ignore[misc]  # *args are the name and pool
        self._infrastructure = f"{socket.gethostname()}:{os.getpid()}"
        self._flows: dict[tuple[UUID, str], Flow[..., Any]] = {}  # by deployment and its last update
        self._runs: dict[UUID, str] = {}  # claimed run -> "waiting" | "running" | "cancelled"
        self._runs_lock = threading.Lock()
        self._threads: anyio.CapacityLimiter | None = None
        self._settings: SettingsContext | None = None
        self._waking: anyio.abc.TaskGroup | None = None

    async def setup(self) -> None:
        prepare_run_logging()
        guard_suspension_observer()
        self._threads = anyio.CapacityLimiter(self._limit or DEFAULT_LIMIT)
        self._settings = quiet_settings()
        await super().setup()
        # Entered after BaseWorker's own task group and left before it (teardown), as nested scopes must be.
        self._waking = anyio.create_task_group()
        await self._waking.__aenter__()
        self._waking.start_soon(self._poll_when_scheduled)

    async def teardown(self, *exc_info: Any) -> None:
        if self._waking is not None:
            self._waking.cancel_scope.cancel()
            await self._waking.__aexit__(None, None, None)
            self._waking = None
        await super().teardown(*exc_info)
        from entrypoints.prefect_server import drain_prefect_workers

        await anyio.to_thread.run_sync(drain_prefect_workers)

    async def _poll_when_scheduled(self) -> None:
        """Poll the pool as soon as the server says a run was scheduled on it; the timed poll is the fallback."""
        # BaseWorker only polls on a timer (PREFECT_WORKER_QUERY_SECONDS): a short one makes a new run wait little
        # but costs the server a write per poll (at 0.1 s, ~0.2 of its core with nothing to do, measured), a long
        # one makes every run wait. Prefect's own events say when to look; events that arrive while a poll is under
        # way make one more poll, not one each (a burst of storefront requests). The timer (5 s in `returns serve`)
        # finds the runs of schedules, which the server's scheduler inserts without events, and whatever a dropped
        # websocket missed.
        wake = anyio.Event()

        async def listen() -> None:
            from prefect.events.clients import get_events_subscriber
            from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

            while True:
                try:
                    while self._work_pool is None:  # known after the first sync with the API
                        await anyio.sleep(0.2)
                    pool = f"prefect.work-pool.{self._work_pool.id}"
                    scheduled = EventFilter(event=EventNameFilter(name=[SCHEDULED]),
                                            related=EventRelatedFilter(resources_in_roles=[(pool, "work-pool")]))
                    async with get_events_subscriber(filter=scheduled) as events:
                        async for _ in events:
                            wake.set()
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:  # noqa: BLE001 - the timed poll still serves; subscribe again shortly
                    self._logger.debug("event wake-up lost (%s); subscribing again", type(exc).__name__)
                    await anyio.sleep(5)

        async with anyio.create_task_group() as group:
            group.start_soon(listen)
            while True:
                await wake.wait()
                wake = anyio.Event()
                try:
                    await self.get_and_submit_flow_runs()
                except Exception as exc:  # noqa: BLE001 - as BaseWorker's own poll loop: the next one retries
                    self._logger.debug("poll on a scheduled event failed (%s)", type(exc).__name__)

    async def run(self, flow_run: FlowRun, configuration: BaseJobConfiguration,
                  task_status: anyio.abc.TaskStatus[int] | None = None) -> InProcessResult:
        flow = await self._flow(flow_run, configuration)
        result = InProcessResult(identifier=self._infrastructure, status_code=0)
        with self._runs_lock:
            self._runs[flow_run.id] = "waiting"
        try:
            if task_status is not None:
                # The flow run's infrastructure_pid: which process holds it (kill_infrastructure reads it).
                task_status.started(self._infrastructure)  # type: ignore[arg-type]
            # anyio copies this task's context variables into the thread, and a cancelled worker (SIGTERM)
            # waits for the thread rather than abandoning it: runs in flight finish.
            state = await anyio.to_thread.run_sync(self._execute, flow, flow_run, limiter=self._threads)
        finally:
            with self._runs_lock:
                held = self._runs.pop(flow_run.id, None)
        if held == "cancelled":  # before its engine started: BaseWorker._cancel_run has marked it Cancelled
            return result
        if state is not None and state.is_cancelling():
            # A thread cannot be interrupted (there is no process to signal, as ProcessWorker's cancellation
            # does through prefect/runner/_cancellation_manager.py): the run went on to its next state change,
            # which the server refused (core_policy.py EnforceCancellingToCancelledTransition), and it ends
            # Cancelled here, as prefect/runner/_cancel_finalizer.py ends a process that was stopped.
            await self.client.set_flow_run_state(flow_run.id, Cancelled(
                message="Cancelled at its next state change: a flow run on a thread cannot be interrupted; "
                        "the return's timeline shows what it did."))
        return result.model_copy(update={"status_code": 0 if state is not None else 1})

    async def _flow(self, flow_run: FlowRun, configuration: BaseJobConfiguration) -> Flow[..., Any]:
        """The deployment's flow, imported once per deployment update."""
        # Pull steps are not run: they place code for a fresh process, and `set_working_directory` would chdir
        # this one under every other run (prefect/flows.py load_flow_from_flow_run, os.chdir). A run executes
        # the code this worker imported, so the entrypoint is imported as a module (a script load would
        # execute flows/returns.py a second time, beside `flows.returns`).
        if flow_run.deployment_id is None:
            raise ValueError("the in-process worker runs deployments' flow runs only")
        key = (flow_run.deployment_id, configuration.labels.get("prefect.io/deployment-updated", ""))
        if key not in self._flows:
            deployment = await self.client.read_deployment(flow_run.deployment_id)
            if not deployment.entrypoint:
                raise ValueError(f"deployment {deployment.name!r} has no entrypoint")
            self._flows[key] = await anyio.to_thread.run_sync(import_flow, deployment.entrypoint)
        return self._flows[key]

    def _execute(self, flow: Flow[..., Any], flow_run: FlowRun) -> State[Any] | None:
        """Run the flow run with Prefect's engine on this thread; its final state (None if the engine raised)."""
        with self._runs_lock:
            if self._runs.get(flow_run.id) == "cancelled":
                return None
            self._runs[flow_run.id] = "running"
        assert self._settings is not None
        try:
            return run_on_this_thread(flow, flow_run, self._settings)
        except BaseException as exc:  # noqa: BLE001 - the engine has recorded what it could; keep serving others
            self.get_flow_run_logger(flow_run).error("flow run ended with %s", type(exc).__name__)
            return None

    async def kill_infrastructure(self, infrastructure_pid: str, configuration: BaseJobConfiguration,
                                  grace_seconds: int = 30) -> None:
        """Cancel a claimed run whose thread has not started the engine (BaseWorker asks only for those)."""
        if infrastructure_pid != self._infrastructure:
            # Every worker on the pool hears of a cancellation; only the one holding the run may answer for it.
            raise InfrastructureNotAvailable(f"flow run held by worker process {infrastructure_pid}")
        run_id = UUID(configuration.labels["prefect.io/flow-run-id"])
        with self._runs_lock:
            held = self._runs.get(run_id)
            if held is None:
                raise InfrastructureNotFound(f"flow run {run_id} is not running here")
            if held == "running":
                raise InfrastructureNotAvailable("a flow run on a thread cannot be interrupted; it ends Cancelled at "
                                                 "its next state change")
            self._runs[run_id] = "cancelled"
