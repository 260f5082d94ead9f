"""Every error the API answers is `application/problem+json` (RFC 9457): type, title, status, detail. No traceback
ever leaves the process: an unexpected error is logged (redacted) and answered as a plain 500 problem."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from entrypoints.prefect_api import RunFailed
from models.errors import InvalidInput, NotFound, PermanentError, ReturnsError, TransientError
from models.schemas import explain
from service.storefront import IdempotencyConflict

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("returns.api")


class ProblemOut(BaseModel):
    """An RFC 9457 problem detail."""

    type: str
    title: str
    status: int
    detail: str | None = None


class Problem(Exception):
    """Raise to answer a problem; `kind` names its type (a relative URI under /problems/)."""

    def __init__(self, status: int, detail: str | None = None, kind: str | None = None,
                 headers: dict[str, str] | None = None, title: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.kind, self.headers = status, detail, kind, headers or {}
        self.title = title or HTTPStatus(status).phrase


def problem(status: int, detail: str | None = None, kind: str | None = None,
            headers: dict[str, str] | None = None, title: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": f"/problems/{kind}" if kind else "about:blank",
                            "title": title or HTTPStatus(status).phrase, "status": status}
    if detail:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def answer(exc: BaseException) -> JSONResponse:
    """The problem for an error raised anywhere below the API."""
    if isinstance(exc, Problem):
        return problem(exc.status, exc.detail, exc.kind, exc.headers, exc.title)
    if isinstance(exc, ValidationError):
        return problem(422, f"invalid input: {explain(exc)}", "invalid-input")
    if isinstance(exc, IdempotencyConflict):
        return problem(422, str(exc), "idempotency-key-reused", title="Idempotency-Key reused")
    if isinstance(exc, NotFound):
        return problem(404, str(exc), "not-found")
    if isinstance(exc, RunFailed):
        return problem(422, "the request flow could not complete the request: " + str(exc)[:300], "request-failed")
    if isinstance(exc, (InvalidInput, PermanentError)):
        return problem(422, str(exc)[:500], "invalid-input")
    if isinstance(exc, TransientError):
        return problem(503, f"temporarily unavailable, retry with the same Idempotency-Key: {str(exc)[:200]}",
                       "unavailable", headers={"Retry-After": "1"})
    log.error("internal error answering a request: %s", type(exc).__name__, exc_info=exc)
    return problem(500, "internal error; it has been logged", "internal")


def install(app: FastAPI) -> None:
    """Route every error through `answer`: ours, FastAPI's validation, Starlette's 404/405, anything else."""

    async def ours(_request: Request, exc: Exception) -> JSONResponse:
        return answer(exc)

    async def validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))[:60]
        return problem(422, f"invalid input: {where}: {first.get('msg', 'invalid')}"[:300], "invalid-input")

    async def http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers) if exc.headers else None
        return problem(exc.status_code, str(exc.detail) if exc.detail else None, headers=headers)

    # Starlette hands a handler for Exception itself to its outermost middleware, which re-raises after
    # answering: the catch-all for the unexpected is `guarded` (a middleware); these are the expected errors.
    for kind in (Problem, ReturnsError, ValidationError):
        app.add_exception_handler(kind, ours)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
