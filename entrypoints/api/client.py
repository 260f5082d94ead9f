"""A storefront's client of the API (the demo and the benchmark use it): a key, JSON in and out, and the 202 path
followed to its end."""

from __future__ import annotations

import time
from typing import Any

import httpx

from models.errors import InvalidInput, NotFound, TransientError
from models.schemas import ReturnRequestIn


class Storefront:
    """POST /v1/quotes and /v1/returns with `Authorization: Bearer KEY`, as a shop's checkout would."""

    def __init__(self, base_url: str, key: str, timeout: float = 60.0) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def quote(self, req: ReturnRequestIn) -> dict[str, Any]:
        return self._json(self.http.post("/v1/quotes", json=_body(req)))

    def create(self, req: ReturnRequestIn, idempotency_key: str, patience: float = 120.0) -> httpx.Response:
        """201 (decided), 202 (still running), or a problem; a 503 or 429 is retried with the same key (that is
        what the key is for) until `patience` runs out."""
        deadline = time.monotonic() + patience
        while True:
            r = self.http.post("/v1/returns", json=_body(req), headers={"Idempotency-Key": idempotency_key})
            if r.status_code not in (429, 503) or time.monotonic() > deadline:
                return r
            time.sleep(min(float(r.headers.get("Retry-After", "1")), 5.0))

    def request(self, req: ReturnRequestIn, idempotency_key: str, patience: float = 120.0) -> dict[str, Any]:
        """The decision: a 202 is followed at its Location until the flow has decided."""
        r = self.create(req, idempotency_key, patience)
        deadline = time.monotonic() + patience
        while r.status_code == 202 or (r.status_code == 200 and r.json().get("status") == "pending"):
            if time.monotonic() > deadline:
                raise TransientError(f"the request {idempotency_key} was not decided within {patience:.0f} s")
            time.sleep(0.2)
            r = self.http.get(r.headers.get("Location") or r.json()["status_url"])
        return self._json(r)

    @staticmethod
    def _json(r: httpx.Response) -> dict[str, Any]:
        if r.status_code >= 400:
            detail = r.json().get("detail", r.text) if r.headers.get("content-type", "").endswith("json") else r.text
            error = NotFound if r.status_code == 404 else TransientError if r.status_code >= 500 else InvalidInput
            raise error(f"HTTP {r.status_code}: {str(detail)[:300]}")
        return dict(r.json())

    def close(self) -> None:
        self.http.close()


def _body(req: ReturnRequestIn) -> dict[str, Any]:
    return req.model_dump(mode="json", exclude_none=True, exclude={"idempotency_key"})
