"""Screenshots of the operators' desk in a real Prefect UI, for docs/: run `returns demo` (it keeps serving the UI
on 127.0.0.1:4200), then `.venv/bin/python scripts/ui_screenshots.py [--ui URL] [--out docs]`.

It asks for one what-if and one report run (as an operator would from their forms), then opens the pages an
operator uses with Debian's Chromium (Playwright, headless) and saves each as ui-<name>.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

CHROMIUM = "/usr/bin/chromium"
FORMS = {  # screenshot name -> deployment whose run form it shows
    "receipt-form": "record-receipt/lantana-dock",
    "dock-session-form": "dock-session/lantana-dock",
    "review-form": "settle-review/operator",
    "what-if-form": "policy-what-if/on-demand",
}
ARTIFACTS = {"board": "returns-board", "what-if": "policy-what-if-summary", "report": "returns-report"}


def deployment(api: httpx.Client, name: str) -> dict[str, Any] | None:
    r = api.get(f"/deployments/name/{name}")
    return r.json() if r.status_code == 200 else None


def run_and_wait(api: httpx.Client, name: str, parameters: dict[str, Any], timeout: float = 300) -> None:
    found = deployment(api, name)
    if found is None:
        raise SystemExit(f"no deployment {name}: is `returns demo` serving this UI?")
    for _ in range(10):  # a busy SQLite server answers 503 (database locked): ask again
        r = api.post(f"/deployments/{found['id']}/create_flow_run", json={"parameters": parameters})
        if r.status_code != 503:
            break
        time.sleep(2)
    if r.status_code >= 300:
        raise SystemExit(f"{name}: the Prefect API answered {r.status_code}: {r.text[:300]}")
    run = r.json()
    deadline = time.monotonic() + timeout
    while (state := api.get(f"/flow_runs/{run['id']}").json()["state"]["type"]) not in ("COMPLETED", "FAILED",
                                                                                        "CRASHED", "CANCELLED"):
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} did not finish within {timeout:.0f} s")
        time.sleep(0.5)
    if state != "COMPLETED":
        raise SystemExit(f"{name} ended {state}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ui", default="http://127.0.0.1:4200")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    api = httpx.Client(base_url=f"{args.ui}/api", timeout=30)
    today = datetime.now(UTC).date()
    run_and_wait(api, "policy-what-if/on-demand", {"policy": {"full_refund_days": 90, "restocking_fee_rate": "0.15"}})
    run_and_wait(api, "returns-report/weekly", {"since": (today - timedelta(days=60)).isoformat(),
                                                "until": (today + timedelta(days=31)).isoformat()})
    pages: dict[str, str] = {"automations": "/automations"}
    for shot, name in FORMS.items():
        if found := deployment(api, name):
            pages[shot] = f"/deployments/deployment/{found['id']}/run"
    for shot, key in ARTIFACTS.items():
        # /artifacts/{key}/latest answers the key's collection, whose id is not an artifact page: ask for the newest.
        found = api.post("/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC",
                                                   "limit": 1}).json()
        if found:
            pages[shot] = f"/artifacts/artifact/{found[0]['id']}"
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            for shot, path in pages.items():
                page.goto(args.ui + path)
                page.wait_for_load_state("networkidle")
                if "/artifacts/" in path:  # every desk artifact has a table; the app renders it after its API calls
                    page.locator("table").first.wait_for(timeout=30_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(args.out / f"ui-{shot}.png"), full_page=True)
                sys.stdout.write(f"ui-{shot}.png  {path}\n")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
