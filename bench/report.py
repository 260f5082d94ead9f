"""The benchmark's results as a markdown table, and what they were measured on (commit, machine)."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| mode | prefect db | N | returns/s | x floor | p50 RMA s | p95 RMA s | client CPU s | worker CPU s "
            "| server CPU s | server CPU ms/return | client RSS MB | worker RSS MB | server RSS MB | ok |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    floor = {r.get("requested_n", r["n"]): r.get("returns_per_s") for r in rows
             if r["mode"] == "floor" and "error" not in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['mode']} | {r['prefect_db']} | {r['n']} | error: {r['error'][:80]} |" + " |" * 11)
            continue
        lat = r["latency_s"]
        server = r.get("server_cpu_incl_settle_s")
        server_txt = "-" if server is None else _f(server, 1) + (
            f" (+{_f(r['pg_cpu_incl_settle_s'], 1)} pg)" if "pg_cpu_incl_settle_s" in r else "")
        ratio = floor.get(r.get("requested_n", r["n"]))
        n_txt = f"{r['n']}" if r.get("requested_n", r["n"]) == r["n"] else f"{r['n']} (for {r['requested_n']})"
        ratio_txt = "1" if r["mode"] == "floor" else (f"1/{ratio / r['returns_per_s']:.0f}" if ratio else "-")
        tags = []
        if r.get("clients", 1) != 4 and r["mode"] == "served":
            tags.append(f"{r['clients']} client")
        mode = r["mode"] + (f" ({', '.join(tags)})" if tags else "")
        out.append(" | ".join([
            f"| {mode}", r["prefect_db"], n_txt, _f(r["returns_per_s"], 2), ratio_txt, _f(lat["p50"], 3),
            _f(lat["p95"], 3), _f(r.get("client_cpu_incl_drain_s", r["client_cpu_s"]), 1),
            _f(r.get("worker_cpu_s"), 1), server_txt, _f(r.get("server_cpu_ms_per_return"), 0),
            _f(r.get("client_rss_mb"), 0), _f(r.get("worker_rss_mb"), 0), _f(r.get("server_rss_mb"), 0),
            "yes" if r["verify"]["ok"] else "NO"]) + " |")
    return "\n".join(out)


def code_version() -> str:
    """The commit the run measured, with '+dirty' when flows/, tasks/, service/ or models/ have local changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "flows", "tasks", "service", "models"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")),
               "0")
    import importlib.metadata as md

    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_gb": round(int(mem) / 2**20, 1),
            "python": platform.python_version(), "prefect": md.version("prefect"), "kernel": platform.release(),
            "date": date.today().isoformat()}
