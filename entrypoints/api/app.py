"""The storefront API (FastAPI): quotes, returns with idempotent creation, status, labels, an order's returns.

Storefronts authenticate with `Authorization: Bearer KEY`; they never hold Prefect's credential. A request is
checked for ownership (R13) here, stored, and handed to the request flow by reference: no email address reaches
Prefect. OpenAPI 3.1 at /openapi.json, its pages at /docs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adapters.clock import utcnow
from entrypoints.api import views
from entrypoints.api.config import ApiConfig
from entrypoints.api.limits import BodyLimit, FailedLookups, TokenBucket
from entrypoints.api.problems import PROBLEM_JSON, Problem, ProblemOut, answer, install, problem
from entrypoints.api.providers import add_provider_webhooks
from entrypoints.api.submit import InProcess, Submitter, ready
from models.errors import InvalidInput
from models.rma import parse_rma
from models.schemas import Key, ReturnRequestIn, Strict, parse
from service.steps import Pipeline

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")
REQUEST_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ReturnRequestIn"}}}}}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    400: {"model": ProblemOut, "description": "Bad request (a required header is missing or malformed)"},
    401: {"model": ProblemOut, "description": "No key, or a wrong or revoked one",
          "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
    404: {"model": ProblemOut, "description": "Not found (for an order: unknown, or not this email's, R13)"},
    413: {"model": ProblemOut, "description": "Request body too large"},
    422: {"model": ProblemOut, "description": "Invalid input, a malformed RMA, or an Idempotency-Key reused"},
    429: {"model": ProblemOut, "description": "Too many requests from this key or address",
          "headers": {"Retry-After": {"schema": {"type": "string"}}}},
    503: {"model": ProblemOut, "description": "Temporarily unavailable: retry (with the same Idempotency-Key)",
          "headers": {"Retry-After": {"schema": {"type": "string"}}}},
}
LINK = {"Location": {"schema": {"type": "string"}, "description": "The return's (or the request's) status URL"}}
REPLAYED = {"Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]},
                                    "description": "Present on the answer to a retried call"}}
IdempotencyHeader = Annotated[str | None, Header(alias="Idempotency-Key",
                                                 description="Your id for this call; a retry sends the same")]
PreferHeader = Annotated[str | None, Header(description="RFC 7240: `wait=N` waits at most N s (up to the "
                                                       "server's own wait) before answering 202")]
PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait=(\d{1,4}(?:\.\d{1,3})?)(?:$|[,;\s])")
bearer = HTTPBearer(auto_error=False, description="A storefront key from `returns api-key create NAME`")


@dataclass
class Api:
    """What the handlers share: the pipeline, how requests reach their stage, the settings and the limits."""

    pipeline: Pipeline
    submitter: Submitter
    config: ApiConfig
    clock: Callable[[], datetime] = utcnow
    keys: TokenBucket = field(init=False)
    addresses: TokenBucket = field(init=False)
    lookups: FailedLookups = field(default_factory=FailedLookups)

    def __post_init__(self) -> None:
        self.keys = TokenBucket(self.config.key_rate, 2 * self.config.key_rate)
        self.addresses = TokenBucket(self.config.address_rate, 2 * self.config.address_rate)


@dataclass(frozen=True)
class Caller:
    """An authenticated storefront: its key's id and hash (the hash scopes Prefect idempotency keys)."""

    key_id: int
    key_hash: str


def client_address(request: Request) -> str:
    return request.client.host if request.client else "-"


def storefront(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    """The calling storefront, from its Bearer key (401 with WWW-Authenticate otherwise), within its rate."""
    api: Api = request.app.state.api
    challenge = 'Bearer realm="returns"'
    if creds is None or creds.scheme.lower() != "bearer":
        raise Problem(401, "send your storefront key as Authorization: Bearer KEY", "unauthorized",
                      headers={"WWW-Authenticate": challenge})
    found = api.pipeline.api_key(creds.credentials) if len(creds.credentials) <= 200 else None
    if found is None:
        raise Problem(401, "that key is not valid (unknown or revoked)", "unauthorized",
                      headers={"WWW-Authenticate": challenge + ', error="invalid_token"'})
    api.keys.check(str(found[0]), "key")
    return Caller(*found)


Storefront = Annotated[Caller, Depends(storefront)]


def create_app(pipeline: Pipeline, submitter: Submitter | None = None, config: ApiConfig | None = None,
               shop_pages: bool = True) -> FastAPI:
    """The API over `pipeline`; requests run in-process unless a submitter (e.g. through Prefect) is given."""
    api = Api(pipeline, submitter or InProcess(pipeline), config or ApiConfig())
    app = FastAPI(title="Returns API", version="1", openapi_url="/openapi.json", docs_url="/docs", redoc_url=None,
                  description=__doc__)
    app.state.api = api
    install(app)

    @app.middleware("http")
    async def per_address(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        wait = api.addresses.take(client_address(request))
        if wait > 0:
            return problem(429, "too many requests from this address", "rate-limited",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: a problem, never a traceback
            return answer(exc)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response


    @app.post("/v1/quotes", response_model=views.QuoteOut, openapi_extra=REQUEST_BODY, tags=["returns"],
              responses={k: v for k, v in PROBLEMS.items() if k != 400}, summary="Quote a return (writes nothing)")
    async def quote(request: Request, caller: Storefront) -> JSONResponse:
        """The decision per line with its clauses and reasons, and the units of each order line still returnable
        (R11). Unknown order and wrong email answer the same 404 (R13)."""
        body = await request.body()
        return JSONResponse(await run_in_threadpool(_quote, api, body))

    @app.post("/v1/returns", status_code=201, response_model=views.ReturnCreated, openapi_extra=REQUEST_BODY,
              tags=["returns"], summary="Ask for a return (idempotent)",
              responses={201: {"headers": LINK | REPLAYED},
                         202: {"model": views.ReturnPending, "description": "Stored; the flow has not finished",
                               "headers": LINK | REPLAYED}, **PROBLEMS})
    async def create_return(request: Request, caller: Storefront, idempotency_key: IdempotencyHeader = None,
                            prefer: PreferHeader = None) -> JSONResponse:
        """Check ownership (R13), store the request and hand it to the request flow; 201 with the decision (and the
        label link when authorized) once it has decided, else 202 with Location. The same Idempotency-Key with the
        same body answers the same again (Idempotent-Replayed: true); with another body, 422."""
        body = await request.body()
        wait = api.config.wait_seconds
        if prefer and (asked := PREFER_WAIT.search(prefer)):
            wait = min(wait, float(asked.group(1)))
        return await run_in_threadpool(_create, api, caller, idempotency_key, body, wait)

    @app.get("/v1/requests/{reference}", response_model=views.ReturnCreated | views.ReturnPending,
             tags=["returns"], summary="A request's outcome", responses=PROBLEMS)
    def request_status(reference: str, caller: Storefront) -> JSONResponse:
        """Where a 202 points: pending, or the decision once the request flow has made it."""
        accepted = api.pipeline.accepted(reference[:40], caller.key_id)
        if accepted.response is not None:
            return JSONResponse(dict(accepted.response))
        decided = api.pipeline.decided_request(accepted)
        if decided is None or not ready(api.pipeline, decided):
            return JSONResponse(views.pending(accepted.reference))
        return JSONResponse(api.pipeline.answered(accepted.reference, views.created(accepted.reference, decided)))

    @app.get("/v1/returns/{rma}", response_model=views.ReturnStatus, tags=["returns"], responses=PROBLEMS,
             summary="A return's state, timeline, lines, amounts and deadline")
    def return_status(rma: str, caller: Storefront) -> JSONResponse:
        """A malformed RMA (a wrong check character) is 422; an unknown one 404."""
        return JSONResponse(views.status(api.pipeline.show(parse_rma(rma), api.clock())))

    @app.get("/v1/returns/{rma}/label.pdf", tags=["returns"], summary="The return label (PDF)",
             responses={200: {"content": {"application/pdf": {"schema": {"type": "string", "format": "binary"}}},
                              "description": "The label and packing slip"}, **PROBLEMS},
             response_class=Response)
    def label(rma: str, caller: Storefront) -> Response:
        """The label PDF of an issued RMA (404 before it is issued, or after a decline)."""
        return label_response(api.pipeline, parse_rma(rma))

    @app.get("/v1/orders/{number}/returns", response_model=views.OrderReturns, tags=["returns"],
             responses=PROBLEMS, summary="Every return of an order")
    def order_returns(number: str, caller: Storefront) -> JSONResponse:
        order = parse(_OrderNumber, {"number": number}).number
        shown = api.pipeline.order_returns(order, api.clock())
        return JSONResponse({"order_number": order, "returns": [views.status(s) for s in shown]})

    add_provider_webhooks(app, api)
    if shop_pages:
        from entrypoints.api.shop import add_shop

        add_shop(app, api)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, limit=api.config.max_body)  # outermost: before anything reads a body
    return app


class _OrderNumber(Strict):
    number: Key


def label_response(pipeline: Pipeline, rma: str) -> Response:
    """The RMA's label PDF, rendered again if its file is missing; 404 when no RMA was issued."""
    shown = pipeline.show(rma, utcnow())
    path = pipeline.render_label(rma) if views.has_label(str(shown["state"])) else None
    if path is None:
        raise Problem(404, f"{rma} has no label: it is not (or no longer) an issued RMA", "no-label")
    return FileResponse(path, media_type="application/pdf", filename=f"{rma}.pdf")


def _quote(api: Api, body: bytes) -> dict[str, Any]:
    req = parse(ReturnRequestIn, body)
    decision = api.pipeline.quote(req, api.clock())
    return decision | {"units": api.pipeline.units_left(req.order_number)}


def _create(api: Api, caller: Caller, idempotency_key: str | None, body: bytes, wait: float) -> JSONResponse:
    if idempotency_key is None:
        raise Problem(400, "POST /v1/returns needs an Idempotency-Key header (a retry sends the same one)",
                      "idempotency-key-required")
    if not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise Problem(400, "an Idempotency-Key is 1-128 visible ASCII characters", "idempotency-key-invalid")
    req = parse(ReturnRequestIn, body)
    if req.idempotency_key not in (None, idempotency_key):
        raise InvalidInput("idempotency_key: the body's differs from the Idempotency-Key header (send the header)")
    accepted = api.pipeline.accept(caller.key_id, idempotency_key, req, api.clock())
    replayed = {"Idempotent-Replayed": "true"} if accepted.replayed else {}
    if accepted.response is not None:
        return JSONResponse(dict(accepted.response), 201,
                            headers=replayed | {"Location": str(accepted.response["status_url"])})
    run_key = "api-" + hashlib.sha256(f"{caller.key_hash}:{idempotency_key}".encode()).hexdigest()[:48]
    decided = api.submitter.submit(accepted, run_key, wait)
    if decided is None:
        body_out = views.pending(accepted.reference)
        return JSONResponse(body_out, 202, headers=replayed | {"Location": body_out["status_url"]})
    answer = api.pipeline.answered(accepted.reference, views.created(accepted.reference, decided))
    return JSONResponse(answer, 201, headers=replayed | {"Location": str(answer["status_url"])})


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the request schema the handlers validate strictly themselves, and every error
    documented as application/problem+json."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    body = ReturnRequestIn.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(body.pop("$defs", {}))
    schemas["ReturnRequestIn"] = body
    for path in doc["paths"].values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                if status[0] in "45":
                    response["content"] = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemOut"}}}
    app.openapi_schema = doc
    return doc
