"""The three ways a return is timed through the pipeline; each takes the same stage functions (service/stages.py).

  floor   the stages with plain steps (LocalSteps), in-process, no Prefect: what the command line runs
  flows   the stage flows called in-process against a local Prefect server, heartbeats off (one caller)
  served  `prefect.yaml` deployed and served by the `returns-in-process` worker in its own process; the bench is
          the storefront and the dock, K clients creating runs over the REST API and waiting for each
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from bench.measure import count_prefect_client_retries, free_port, iso, machine_busy, self_cpu, self_hwm_mb, summary
from bench.run import RECEIPT_DEPLOYMENT, REQUEST_DEPLOYMENT, Run
from bench.workload import receipt_params, request_params
from entrypoints.prefect_server import WORKER_POLL_SECONDS


def floor(run: Run) -> None:
    """The stage functions with the steps called directly: the path of the flows, without Prefect."""
    from adapters.clock import utcnow
    from models.schemas import ReceiptIn, ReturnRequestIn, parse
    from models.states import State
    from service import stages
    from service.stages import LocalSteps

    steps = LocalSteps(run.pipeline, utcnow)
    reqs = [parse(ReturnRequestIn, request_params(i, run.tag)) for i in range(run.n)]
    prof = run._profiler()
    cpu0, t0, run.busy0 = self_cpu(), time.monotonic(), machine_busy()
    lat = []
    for i, req in enumerate(reqs):
        s = time.monotonic()
        decided = stages.after_request(steps, req)
        lat.append(time.monotonic() - s)
        assert decided.state is State.AUTHORIZED and decided.rma_number, decided
        run.rmas[i] = decided.rma_number
        run.deadline.check("requesting")
    t1 = time.monotonic()
    for i in range(run.n):
        receipt = parse(ReceiptIn, receipt_params(i, run.rmas[i], utcnow()))
        out = stages.after_receipt(steps, receipt)
        assert out.state is State.COMPLETED, out
        run.deadline.check("receiving")
    t2 = time.monotonic()
    run._profile_done(prof, "client")
    run._phase_end(lat, t0, t1, t2, cpu0)
    run.result["client_rss_mb"] = self_hwm_mb()


def flows(run: Run) -> None:
    """The stage flows called in this process, each a flow run on the server with its task runs."""
    retries = count_prefect_client_retries()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from adapters.clock import utcnow
    from entrypoints.prefect_server import drain_prefect_workers
    from flows.returns import record_receipt, request_return
    from models.schemas import ReceiptLineIn, RequestLineIn

    assert run.monitor is not None
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        # the first flow call pays a per-process cost a served process pays once too: it stays inside, 1 of N
        run._measure_idle()
        prof = run._profiler()
        cpu0, m0, t0, run.busy0 = self_cpu(), run.monitor.mark(), time.monotonic(), machine_busy()
        run.m_start = m0
        lat = []
        for i in range(run.n):
            params = request_params(i, run.tag)
            params["lines"] = [RequestLineIn(**ln) for ln in params["lines"]]
            s = time.monotonic()
            out = request_return(**params)
            lat.append(time.monotonic() - s)
            assert out["state"] == "authorized", out
            run.rmas[i] = out["rma_number"]
            run.deadline.check("requesting")
        t1 = time.monotonic()
        for i in range(run.n):
            rp = receipt_params(i, run.rmas[i], utcnow())
            out = record_receipt(rma=rp["rma"], received_at=datetime.fromisoformat(rp["received_at"]),
                                 lines=[ReceiptLineIn(**ln) for ln in rp["lines"]], by=rp["by"])
            assert out["state"] == "completed", out
            run.deadline.check("receiving")
        t2 = time.monotonic()
        run._profile_done(prof, "client")
        run._phase_end(lat, t0, t1, t2, cpu0)
        s = time.monotonic()
        drain_prefect_workers()
        run.result["client_drain_s"] = round(time.monotonic() - s, 2)
    run.result["client_cpu_incl_drain_s"] = round(self_cpu() - cpu0, 2)
    run.result["client_rss_mb"] = self_hwm_mb()
    run.result["client_retries"] = retries.by_status
    run._settle(m0, t2)


def api(run: Run) -> None:
    """As `served`, but the K storefronts call the storefront API (POST /v1/returns to its 201, the API running
    the request run itself, as `returns serve` does); the docks still create record-receipt runs over REST."""
    served(run, through_api=True)


def served(run: Run, through_api: bool = False) -> None:
    """Deploy prefect.yaml, start the in-process worker, and drive it over REST as K storefronts and docks."""
    from entrypoints.prefect_api import PrefectApi

    assert run.monitor is not None
    t0 = time.monotonic()
    run.worker = start_worker(run)
    run.register_pid(run.worker.pid)
    api = PrefectApi(run.api_url)
    while True:  # the deployments are applied before the worker starts polling
        run.deadline.check("waiting for the deployments")
        if run.worker.poll() is not None:
            raise RuntimeError(f"the worker exited ({run.worker.returncode}); see worker.log")
        try:
            api.deployment_id(REQUEST_DEPLOYMENT), api.deployment_id(RECEIPT_DEPLOYMENT)
            break
        except Exception:  # noqa: BLE001 - not registered yet
            time.sleep(0.2)
    run.result["worker_start_s"] = round(time.monotonic() - t0, 2)
    time.sleep(1.0)  # let the worker's first poll settle
    k, poll = run.spec["clients"], run.spec["poll"]
    apis: list[PrefectApi] = []  # one REST client per storefront / dock thread
    local = threading.local()
    lock = threading.Lock()

    def client() -> PrefectApi:
        if not hasattr(local, "api"):
            local.api = PrefectApi(run.api_url)
            local.api._deployments = dict(api._deployments)
            with lock:
                apis.append(local.api)
        return local.api  # type: ignore[no-any-return]

    storefront = _Storefront(run, api) if through_api else None

    def one_request(i: int) -> dict[str, Any]:
        params = request_params(i, run.tag)
        wall, s = time.time(), time.monotonic()
        if storefront is not None:
            answer = storefront.request(params, params["idempotency_key"])
            return {"i": i, "wall": wall, "lat": time.monotonic() - s, "post": 0.0, "run": {}, "id": answer}
        run_id = client().create_run(REQUEST_DEPLOYMENT, params, idempotency_key=params["idempotency_key"])
        created = time.monotonic()
        flow_run = client().wait(run_id, timeout=max(1.0, run.deadline.left()), poll=poll, max_poll=poll)
        return {"i": i, "wall": wall, "lat": time.monotonic() - s, "post": created - s,
                "run": _run_times(flow_run), "id": run_id}

    def one_receipt(i: int) -> dict[str, Any]:
        params = receipt_params(i, run.rmas[i], datetime.now(UTC))
        s = time.monotonic()
        run_id = client().create_run(RECEIPT_DEPLOYMENT, params, idempotency_key=f"receipt-{run.tag}-{i}")
        if run.spec.get("dock_waits_on") == "database":
            # A dock does not watch its runs: the bench learns that the return is done from the returns database,
            # then reads the run (its notify step ends it) with the product's own backing-off poll, so that the
            # Prefect server is not also serving 20 polls a second per dock while it is measured.
            run.wait_completed(run.rmas[i], max(1.0, run.deadline.left()))
            flow_run = client().wait(run_id, timeout=max(1.0, run.deadline.left()))
        else:
            flow_run = client().wait(run_id, timeout=max(1.0, run.deadline.left()), poll=poll, max_poll=poll)
        return {"i": i, "lat": time.monotonic() - s, "run": _run_times(flow_run), "id": run_id}

    run._measure_idle()
    prof = run._profiler()
    cpu0, m0, t0, run.busy0 = self_cpu(), run.monitor.mark(), time.monotonic(), machine_busy()
    run.m_start = m0
    with ThreadPoolExecutor(max_workers=k, thread_name_prefix="storefront") as pool:
        requests = list(pool.map(one_request, range(run.n)))
    t1 = time.monotonic()
    run.rmas = run._rmas_by_order()
    with ThreadPoolExecutor(max_workers=k, thread_name_prefix="dock") as pool:
        receipts = list(pool.map(one_receipt, range(run.n)))
    t2 = time.monotonic()
    run._profile_done(prof, "client")
    m_end = run.monitor.mark()
    run._phase_end([r["lat"] for r in requests], t0, t1, t2, cpu0)
    r = run.result
    r["client_rss_mb"] = self_hwm_mb()
    r["client_busy_retries"] = {str(code): sum(a.busy.get(code, 0) for a in apis) for code in (503, 429)}
    r["post_s"] = summary([q["post"] for q in requests])
    r["label_latency_s"] = summary(run._label_latencies(requests))
    r["request_run"] = _decompose(requests)
    r["receipt_run"] = _decompose(receipts)
    r["receipt_latency_s"] = summary([q["lat"] for q in receipts])
    r["worker_cpu_s"] = round(m_end["worker"] - m0["worker"], 2)
    run._settle(m0, t2)
    if storefront is None:
        r["request_states"] = run._state_gaps(api, [q["id"] for q in requests])
    else:
        r["api_ran"] = storefront.ran()
        storefront.close()
    r["receipt_states"] = run._state_gaps(api, [q["id"] for q in receipts])
    from entrypoints.prefect_server import stop_worker

    stop_worker(run.worker)  # SIGTERM: the worker lets runs in flight finish
    r["worker_rss_mb"] = run.monitor.peak_mb("worker")


class _Storefront:
    """The storefront API on a loopback port of this process, and a client of it per thread."""

    def __init__(self, run: Run, prefect: Any) -> None:
        from adapters.clock import utcnow
        from entrypoints.api.app import create_app
        from entrypoints.api.config import ApiConfig
        from entrypoints.api.serve import api_thread
        from entrypoints.api.submit import ThroughPrefect

        self.submitter = ThroughPrefect.over(prefect, run.pipeline)
        config = ApiConfig(secret=b"bench", key_rate=1e6, address_rate=1e6, wait_seconds=120)
        self._serving = api_thread(create_app(run.pipeline, self.submitter, config), "127.0.0.1", free_port())
        self.url = self._serving.__enter__()
        self.key = run.pipeline.create_api_key(f"bench-{run.tag}", utcnow())
        self._local = threading.local()

    def request(self, params: dict[str, Any], key: str) -> str:
        """POST /v1/returns to its 201; the request's reference."""
        from entrypoints.api.client import Storefront
        from models.schemas import ReturnRequestIn, parse

        if not hasattr(self._local, "client"):
            self._local.client = Storefront(self.url, self.key, timeout=300)
        return str(self._local.client.request(parse(ReturnRequestIn, params), key)["rma_number"])

    def ran(self) -> int:
        return self.submitter.here.ran if self.submitter.here else 0

    def close(self) -> None:
        self.submitter.close()
        self._serving.__exit__(None, None, None)


def start_worker(run: Run) -> subprocess.Popen[bytes]:
    """The returns pool, `prefect.yaml` applied, and the in-process worker on it, as the main command starts them."""
    from entrypoints.prefect_api import PrefectApi
    from entrypoints.prefect_server import IN_PROCESS, POOL, deploy_all
    from entrypoints.prefect_server import start_worker as start

    PrefectApi(run.api_url).create_work_pool(POOL, IN_PROCESS)
    env = dict(os.environ) | {"PREFECT_WORKER_QUERY_SECONDS": str(run.spec.get("worker_poll", WORKER_POLL_SECONDS))}
    worker = start(env, run.work / "worker.log", limit=run.spec.get("workers", 4))
    deploy_all(env, run.work / "deploy.log")
    return worker


def _run_times(flow_run: dict[str, Any]) -> dict[str, Any]:
    return {"created": flow_run.get("created"), "start": flow_run.get("start_time"), "end": flow_run.get("end_time"),
            "seen": datetime.now(UTC).isoformat()}


def _decompose(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a served run's latency goes: created -> Running (poll + claim + engine), Running -> Completed,
    Completed -> the client sees it (its poll)."""
    queued, running, seen = [], [], []
    for q in items:
        t = q["run"]
        c, s, e, w = (iso(t.get(k)) for k in ("created", "start", "end", "seen"))
        if c and s and e and w:
            queued.append((s - c).total_seconds())
            running.append((e - s).total_seconds())
            seen.append((w - e).total_seconds())
    return {"created_to_running": summary(queued), "running_to_completed": summary(running),
            "completed_to_seen": summary(seen)}

