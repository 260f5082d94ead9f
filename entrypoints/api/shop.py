"""The shopper's returns pages, server-rendered with Jinja2 (no JavaScript needed): look up an order (R13), see what
each item can do and why, pick items, see the quote, submit; then the return's page with its RMA and label.

A look-up that matches opens a short session scoped to that order (signed, HttpOnly, SameSite cookie); failed look-ups
from one address are slowed, then refused (429). Every form carries a CSRF token tied to the session."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from pydantic import ValidationError

from adapters.mail.templates import TEMPLATES
from entrypoints.api import sessions, views
from entrypoints.api.app import label_response
from entrypoints.api.problems import Problem
from entrypoints.api.submit import ready
from models.errors import InvalidInput, NotFound
from models.policy import ALLOWED_RESOLUTIONS, DEFAULT_RESOLUTION, Reason
from models.rma import parse_rma
from models.schemas import explain
from service.returns import SAME_ANSWER_FOR_R13

PAGES = Environment(loader=FileSystemLoader(TEMPLATES / "shop"), autoescape=select_autoescape(["html", "j2"]),
                    undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
REASONS = {
    "unwanted": "I changed my mind (unopened items, P3/P4)",
    "damaged": "It arrived damaged (within 48 hours of delivery, P5)",
    "shipping_error": "You sent the wrong item or quantity (within 48 hours, P5)",
    "wrong_product": "I ordered the wrong product (within 30 days, P6)",
}
RESOLUTIONS = {"refund": "Refund to my original payment", "replacement": "Send a replacement",
               "exchange": "Exchange for the correct product"}
OUTCOME_WORDS = {"authorized": "Can be returned", "declined": "Cannot be returned", "review": "Needs a check"}
MAX_FORM = 16 * 1024
RETURN_PAGE = re.compile(r"/returns/rma/RMA-[0-9A-Z]{7}")


def add_shop(app: FastAPI, api: Any) -> None:
    """The pages at /returns, sharing the API's pipeline, submitter and limits."""
    secret = api.config.secret

    def render(request: Request, name: str, session: sessions.Session, status: int = 200,
               headers: dict[str, str] | None = None, **values: Any) -> HTMLResponse:
        html = PAGES.get_template(name).render(csrf=sessions.csrf_token(secret, session), order=session.order,
                                               shop=api.pipeline.settings.shop, **values)
        response = HTMLResponse(html, status_code=status, headers=headers)
        keep(response, session)
        response.headers["Content-Security-Policy"] = ("default-src 'none'; style-src 'self' 'unsafe-inline'; "
                                                       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    def keep(response: Response, session: sessions.Session) -> None:
        response.set_cookie(sessions.COOKIE, sessions.dump(secret, session), max_age=60 * api.config.session_minutes,
                            path="/returns", httponly=True, samesite="lax", secure=api.config.secure_cookies)

    def current(request: Request) -> sessions.Session | None:
        return sessions.load(secret, request.cookies.get(sessions.COOKIE))

    async def form(request: Request) -> tuple[sessions.Session, dict[str, list[str]]]:
        """The posted form of a live session whose CSRF token matches; 403 otherwise."""
        body = await request.body()
        if len(body) > MAX_FORM:
            raise Problem(413, "the form is too large")
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=200)
        session = current(request)
        if session is None or not sessions.csrf_ok(secret, session, (fields.get("csrf") or [""])[0]):
            raise Problem(403, "this form has expired or did not come from this site: reload the page and try again",
                          "csrf")
        return session, fields

    def order_session(request: Request) -> sessions.Session | None:
        session = current(request)
        return session if session is not None and session.order else None

    def to_lookup(then: str | None = None) -> RedirectResponse:
        """The look-up page; `then` (a return's page, e.g. from the RMA email) is where a match goes next."""
        return RedirectResponse(f"/returns?next={quote(then)}" if then else "/returns", status_code=303)

    @app.get("/returns", response_class=HTMLResponse, include_in_schema=False)
    def lookup_page(request: Request) -> HTMLResponse:
        session = current(request) or sessions.new_session(None, api.config.session_minutes)
        return render(request, "lookup.html.j2", session, error=None, order_number="",
                      then=onward(request.query_params.get("next")))

    @app.post("/returns", response_class=HTMLResponse, include_in_schema=False)
    async def lookup(request: Request) -> Response:
        session, fields = await form(request)
        client = request.client.host if request.client else "-"
        if wait := api.lookups.refused_for(client):
            return render(request, "lookup.html.j2", session, 429, {"Retry-After": str(int(wait) + 1)},
                          error="Too many attempts from this connection. Please wait a while and try again, or call "
                                "Customer Care.", order_number="", then=None)
        number, email = first(fields, "order_number").strip(), first(fields, "email").strip()
        matched = len(number) <= 64 and len(email) <= 254 and await run_in_threadpool(
            api.pipeline.owner_matches, number, email)
        if not matched:
            await asyncio.sleep(api.lookups.failed(client))  # slowed, without holding a worker thread
            return render(request, "lookup.html.j2", session, 200, error=SAME_ANSWER_FOR_R13.capitalize() + ".",
                          order_number=number[:64], then=onward(first(fields, "next")))
        response = RedirectResponse(onward(first(fields, "next")) or "/returns/order", status_code=303)
        keep(response, sessions.new_session(number, api.config.session_minutes))
        return response

    @app.get("/returns/order", response_class=HTMLResponse, include_in_schema=False)
    def order_page(request: Request) -> Response:
        session = order_session(request)
        if session is None:
            return to_lookup()
        return render(request, "order.html.j2", session, error=None, **order_view(api, session.order or ""))

    @app.post("/returns/order/quote", response_class=HTMLResponse, include_in_schema=False)
    async def quote_page(request: Request) -> Response:
        session, fields = await form(request)
        if not session.order:
            return to_lookup()
        try:
            chosen = choices(fields)
            req = await run_in_threadpool(api.pipeline.owned_request, session.order, chosen)
            decision = await run_in_threadpool(api.pipeline.quote, req, api.clock())
        except (InvalidInput, ValidationError) as exc:
            view = await run_in_threadpool(order_view, api, session.order)
            return render(request, "order.html.j2", session, 422, error=plain(exc), **view)
        names = {u["sku"]: u["name"] for u in await run_in_threadpool(api.pipeline.units_left, session.order)}
        return render(request, "quote.html.j2", session, decision=decision, names=names, chosen=chosen,
                      nonce=secrets.token_urlsafe(16), words=OUTCOME_WORDS)

    @app.post("/returns/order/submit", include_in_schema=False)
    async def submit(request: Request) -> Response:
        session, fields = await form(request)
        if not session.order:
            return to_lookup()
        nonce = first(fields, "nonce")[:40]
        try:
            req = await run_in_threadpool(api.pipeline.owned_request, session.order, choices(fields))
            accepted = await run_in_threadpool(api.pipeline.accept, None, f"shop:{nonce}", req, api.clock())
            decided = await run_in_threadpool(api.submitter.submit, accepted, f"shop-{digest(nonce)}",
                                              api.config.wait_seconds)
        except (InvalidInput, ValidationError) as exc:
            view = await run_in_threadpool(order_view, api, session.order)
            return render(request, "order.html.j2", session, 422, error=plain(exc), **view)
        if decided is not None and decided.rma_number:
            return RedirectResponse(f"/returns/rma/{decided.rma_number}", status_code=303)
        return RedirectResponse(f"/returns/requests/{accepted.reference}", status_code=303)

    @app.get("/returns/requests/{reference}", response_class=HTMLResponse, include_in_schema=False)
    def request_page(request: Request, reference: str) -> Response:
        """A request still being decided (the page refreshes itself), or a declined one with its reasons."""
        session = order_session(request)
        if session is None:
            return to_lookup()
        try:
            accepted = api.pipeline.accepted(reference[:40], None)
        except NotFound:
            return not_found(request, session)
        if accepted.order_number != session.order:
            return not_found(request, session)
        decided = api.pipeline.decided_request(accepted)
        if ready(api.pipeline, decided) and decided is not None and decided.rma_number:
            return RedirectResponse(f"/returns/rma/{decided.rma_number}", status_code=303)
        return render(request, "request.html.j2", session, decided=decided, words=OUTCOME_WORDS,
                      names={u["sku"]: u["name"] for u in api.pipeline.units_left(accepted.order_number)})

    def owned_return(request: Request, rma_text: str) -> Response | tuple[sessions.Session, dict[str, Any]]:
        """The session and the return, if it belongs to the session's order; else the page to answer (the look-up
        without a session; 404 for another order's RMA, as for an unknown one)."""
        session = order_session(request)
        if session is None:
            return to_lookup(f"/returns/rma/{rma_text}")
        try:
            shown: dict[str, Any] | None = api.pipeline.show(parse_rma(rma_text), api.clock())
        except (InvalidInput, NotFound):
            shown = None
        if shown is None or shown["order_number"] != session.order:
            return not_found(request, session)
        return session, shown

    def not_found(request: Request, session: sessions.Session) -> HTMLResponse:
        return render(request, "missing.html.j2", session, 404)

    @app.get("/returns/rma/{rma}", response_class=HTMLResponse, include_in_schema=False)
    def return_page(request: Request, rma: str) -> Response:
        found = owned_return(request, rma)
        if isinstance(found, Response):
            return found
        session, shown = found
        names = {u["sku"]: u["name"] for u in api.pipeline.units_left(session.order or "")}
        return render(request, "return.html.j2", session, ret=views.status(shown), names=names,
                      words=OUTCOME_WORDS, address=api.pipeline.settings.shop.returns_address_lines)

    @app.get("/returns/rma/{rma}/label.pdf", include_in_schema=False)
    def label_page(request: Request, rma: str) -> Response:
        found = owned_return(request, rma)
        return found if isinstance(found, Response) else label_response(api.pipeline, str(found[1]["rma_number"]))


def onward(path: str | None) -> str | None:
    """A return's page to go on to after the look-up; anything else (another site, another path) is dropped."""
    return path if path and RETURN_PAGE.fullmatch(path) else None


def first(fields: dict[str, list[str]], name: str) -> str:
    return (fields.get(name) or [""])[0]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:48]


def plain(exc: Exception) -> str:
    """An error in words a shopper can act on (the field names are the form's)."""
    text = f"Please check the form: {explain(exc)}" if isinstance(exc, ValidationError) else str(exc)
    return text[:300]


def choices(fields: dict[str, list[str]]) -> dict[str, Any]:
    """The request fields from the item form: quantities per sku, the reason, the resolution, exchange items."""
    reason = first(fields, "reason")
    if reason not in REASONS:
        raise InvalidInput("please choose why you are returning the items")
    resolution = first(fields, "resolution") or str(DEFAULT_RESOLUTION[Reason(reason)])
    lines = []
    for name, values in fields.items():
        if not name.startswith("qty_") or not values[0].strip() or values[0].strip() == "0":
            continue
        sku = name[4:]
        if not values[0].strip().isdigit():
            raise InvalidInput(f"the quantity for {sku[:64]} must be a whole number")
        line: dict[str, Any] = {"sku": sku, "quantity": int(values[0]),
                                "unopened": first(fields, f"opened_{sku}") != "yes"}
        if reason == "wrong_product":
            line["exchange_sku"] = first(fields, f"exchange_{sku}") or None
        lines.append(line)
    if not lines:
        raise InvalidInput("please choose at least one item and how many to return")
    return {"reason": reason, "resolution": resolution, "lines": lines}


def order_view(api: Any, order: str) -> dict[str, Any]:
    """Each item of the order with what can be returned, why or why not (plain words and the clause), and how many
    units are left (R11); the order's returns so far; the form's choices."""
    units = api.pipeline.units_left(order)
    items = []
    for u in units:
        verdict = None
        if u["quantity_left"] > 0:
            req = api.pipeline.owned_request(order, {"reason": "unwanted", "lines": [
                {"sku": u["sku"], "quantity": 1, "unopened": True}]})
            line = api.pipeline.quote(req, api.clock())["lines"][0]
            verdict = {"decision": line["decision"], "reason": line["reason"], "clauses": line["clauses"]}
        items.append(u | {"verdict": verdict})
    returns = [views.status(s) for s in api.pipeline.order_returns(order, api.clock())]
    return {"items": items, "returns": returns, "reasons": REASONS, "resolutions": RESOLUTIONS,
            "allowed": {str(r): sorted(str(x) for x in ALLOWED_RESOLUTIONS[r]) for r in Reason},
            "products": api.pipeline.catalog(), "words": OUTCOME_WORDS}
