"""What the benchmark measures with: /proc CPU and memory per process group, percentiles, the Prefect client's
retries, PostgreSQL for the Prefect server, deadlines and subprocess groups."""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_DB = "prefect_bench"
PG_URL = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{PG_DB}"


# ---- /proc -------------------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[float, int, int] | None:
    """(CPU seconds user+system, session id, VmHWM kB) of a live process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of stat)
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return cpu, int(fields[3]), hwm


def session_pids(sid: int) -> list[int]:
    """Every live process in the session led by `sid` (a server started with start_new_session)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st and st[1] == sid:
                out.append(int(entry.name))
    return out


def pg_backend_pids(dbname: str = PG_DB) -> list[int]:
    """PostgreSQL backends serving `dbname` (their process title names the database)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("postgres: ") and f" {dbname} " in title:
                out.append(int(entry.name))
    return out


def machine_busy() -> float:
    """CPU seconds all processes on the machine have used since boot (every core; /proc/stat minus idle)."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(parts[:8]) - parts[3] - parts[4]) / CLK_TCK  # without idle and iowait


def wait_for_quiet(max_wait: float, threshold: float = 0.25, window: float = 5.0) -> float:
    """Wait (up to `max_wait` s) until other processes use less than `threshold` of a core over `window` s;
    returns what they used over the last window (cores). Someone's test suite on a 2-core machine halves our
    numbers, so the runs wait for a quiet machine and record how quiet it was."""
    end = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_busy(), time.monotonic()
        time.sleep(window)
        load = (machine_busy() - b0) / (time.monotonic() - t0)
        if load < threshold or time.monotonic() >= end:
            return load
        say(f"machine busy ({load:.2f} cores used by others); waiting for it to be quiet")


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def self_hwm_mb() -> float:
    st = proc_stat(os.getpid())
    return round(st[2] / 1024, 1) if st else 0.0


class Monitor:
    """Samples the CPU and VmHWM of process groups every `period` s (so exited processes still count)."""

    def __init__(self, groups: dict[str, Callable[[], Iterable[int]]], period: float = 0.5) -> None:
        self.groups = groups
        self.cpu: dict[str, dict[int, float]] = {g: {} for g in groups}
        self.hwm: dict[str, dict[int, int]] = {g: {} for g in groups}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="bench-monitor", daemon=True)
        self.period = period

    def sample(self) -> None:
        with self.lock:
            for group, pids in self.groups.items():
                for pid in pids():
                    st = proc_stat(pid)
                    if st:
                        self.cpu[group][pid] = st[0]
                        self.hwm[group][pid] = max(self.hwm[group].get(pid, 0), st[2])

    def _loop(self) -> None:
        while not self.stop_event.wait(self.period):
            self.sample()

    def start(self) -> Monitor:
        self.sample()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)

    def mark(self) -> dict[str, float]:
        """Cumulative CPU seconds per group right now."""
        self.sample()
        with self.lock:
            return {g: sum(v.values()) for g, v in self.cpu.items()}

    def idle_rate(self, seconds: float) -> dict[str, float]:
        """Cores each group uses over the next `seconds` (call it with nothing to do: the idle floor)."""
        m0, t0 = self.mark(), time.monotonic()
        time.sleep(seconds)
        m1, t1 = self.mark(), time.monotonic()
        return {g: (m1[g] - m0[g]) / (t1 - t0) for g in m0}

    def until_quiet(self, idle: float, margin: float, groups: Iterable[str] | None = None, quiet_for: float = 3.0,
                    more: Callable[[], bool] = lambda: True) -> tuple[float, dict[str, float]]:
        """Sample every second until `groups` (default all) have used at most `idle + margin` cores for `quiet_for`
        s, or `more()` is False: when they were last busy, and the marks then."""
        last = self.mark()
        quiet_since, busy_mark = time.monotonic(), last
        while more():
            time.sleep(1.0)
            now = self.mark()
            busy = sum(now[g] - last[g] for g in (groups if groups is not None else now))
            last = now
            if busy > idle + margin:
                quiet_since, busy_mark = time.monotonic(), now
            elif time.monotonic() - quiet_since >= quiet_for:
                break
        return quiet_since, busy_mark

    def peak_mb(self, group: str) -> float:
        """The largest VmHWM of one process of the group."""
        with self.lock:
            return round(max(self.hwm[group].values(), default=0) / 1024, 1)


# ---- small helpers -----------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def summary(values: list[float]) -> dict[str, float | None]:
    return {"p50": pct(values, 50), "p95": pct(values, 95), "max": max(values) if values else None,
            "mean": statistics.fmean(values) if values else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def iso(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def say(text: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"bench timeout while {what}")


class RetryCounter(logging.Filter):
    """Counts Prefect client retries (503/429 or transport errors, logged at DEBUG) and keeps other records
    at the level they had: attach to the `prefect.client` logger after lowering it to DEBUG."""

    def __init__(self, keep_level: int) -> None:
        super().__init__()
        self.keep_level = keep_level
        self.retries = 0
        self.by_status: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if "retryable" in msg:
            self.retries += 1
            key = "503" if " 503" in msg else "429" if " 429" in msg else "other"
            self.by_status[key] = self.by_status.get(key, 0) + 1
        return record.levelno >= self.keep_level


def count_prefect_client_retries() -> RetryCounter:
    import prefect.main  # noqa: F401 - configures logging; importing it later would reset the level set below

    lg = logging.getLogger("prefect.client")
    counter = RetryCounter(lg.getEffectiveLevel())
    lg.setLevel(logging.DEBUG)
    lg.addFilter(counter)
    return counter


# ---- PostgreSQL for the Prefect server ---------------------------------------------------------------------


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


def recreate_prefect_db(drop_only: bool = False) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
        if drop_only:
            return
        conn.execute(f"CREATE DATABASE {PG_DB}")
    with psycopg.connect(PG_ADMIN.replace("dbname=postgres", f"dbname={PG_DB}"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")


def write_profile(profs: list[Any], path: Path) -> None:
    import io
    import pstats

    if not profs:
        return
    buf = io.StringIO()
    st = pstats.Stats(profs[0], stream=buf)
    for p in profs[1:]:
        st.add(p)
    st.sort_stats("tottime").print_stats(45)
    st.sort_stats("cumulative").print_stats(60)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue())


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
