"""Prefect flows: orchestration only, one flow per stage entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.settings import get_current_settings

# Every flow's options. Results are never persisted: the returns database holds what a run decided, and a run
# answers JSON. The storage is named anyway because without one Prefect's engine asks the server for its default
# result storage twice per flow run (GET /admin/storage: ~5 ms of the server's CPU each, measured; 4 calls per
# return). The path is the one Prefect falls back to when the server names none, so nothing else changes.
FLOW_OPTIONS: dict[str, Any] = {"persist_result": False, "log_prints": False,
                                "result_storage": Path(get_current_settings().results.local_storage_path)}
