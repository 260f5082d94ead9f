"""Payment providers' webhooks in: `POST /v1/providers/stripe/webhook` and `POST /v1/providers/paypal/webhook`.

A verified event about one of our refunds has the process stage ask the provider about that refund (the event is a
hint, never the truth), once per event id; a redelivery is answered 200 and ignored. A call that does not verify is
refused with 400 and logged without its body."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from adapters.payments.events import ProviderEvent, Unverified, paypal_event, stripe_event
from adapters.payments.paypal import PayPalRefunds
from adapters.payments.providers import WEBHOOK_SECRETS
from entrypoints.api.problems import Problem, ProblemOut
from models.errors import StaleState

if TYPE_CHECKING:
    from entrypoints.api.app import Api

log = logging.getLogger("returns.api")



class EventReceived(BaseModel):
    """The provider may stop delivering this event."""

    received: bool
    duplicate: bool


RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ProblemOut, "description": "Not a verified event (no signature, a wrong or an old one)"},
    404: {"model": ProblemOut, "description": "This provider's webhook is not set up here"},
    413: {"model": ProblemOut, "description": "Request body too large"},
    429: {"model": ProblemOut, "description": "Too many requests from this address"},
    503: {"model": ProblemOut, "description": "Temporarily unavailable: the provider retries"},
}


def add_provider_webhooks(app: FastAPI, api: Api) -> None:
    """The providers' webhook routes on `app` (no storefront key: the provider's signature is the credential)."""

    @app.post("/v1/providers/stripe/webhook", response_model=EventReceived, tags=["providers"], responses=RESPONSES,
              summary="Stripe's events (Stripe-Signature checked)")
    async def stripe_webhook(request: Request) -> JSONResponse:
        """A refund event re-drives its return, once per event id."""
        return await _received(api, "stripe", request)

    @app.post("/v1/providers/paypal/webhook", response_model=EventReceived, tags=["providers"], responses=RESPONSES,
              summary="PayPal's events (transmission signature verified by PayPal)")
    async def paypal_webhook(request: Request) -> JSONResponse:
        """A refund event re-drives its return, once per event id."""
        return await _received(api, "paypal", request)


async def _received(api: Api, provider: str, request: Request) -> JSONResponse:
    body = await request.body()
    client = request.client.host if request.client else "-"
    return JSONResponse(await run_in_threadpool(_handle, api, provider, body, dict(request.headers), client))


def _handle(api: Api, provider: str, body: bytes, headers: Mapping[str, str], client: str) -> dict[str, bool]:
    secret = api.pipeline.providers.webhook_secret(provider)
    if secret is None:
        log.warning("refused a %s webhook call from %s: not set up (%s)", provider, client, WEBHOOK_SECRETS[provider])
        raise Problem(404, f"this shop takes no {provider} webhooks: set {WEBHOOK_SECRETS[provider]}", "not-set-up")
    try:
        event = _verified(api, provider, body, headers, secret)
    except Unverified as exc:
        log.warning("refused a %s webhook call from %s: %s (%d bytes, not logged)", provider, client, exc, len(body))
        raise Problem(400, str(exc), "unverified-event") from None
    heard = api.pipeline.provider_event(event)
    if heard.duplicate:
        log.info("%s event %s (%s) again: ignored", provider, event.event_id, event.type)
        return {"received": True, "duplicate": True}
    if heard.rma:
        # StaleState: another worker completed or parked it meanwhile, so nothing is left to do for this event.
        with contextlib.suppress(StaleState):
            api.submitter.process(heard.rma, f"provider-event:{provider}:{event.event_id}")
    fresh = api.pipeline.remember_provider_event(event, heard.rma, api.clock())
    log.info("%s event %s (%s): %s", provider, event.event_id, event.type,
             f"asked about the refund of {heard.rma}" if heard.rma else "nothing of ours waits on it")
    return {"received": True, "duplicate": not fresh}


def _verified(api: Api, provider: str, body: bytes, headers: Mapping[str, str], secret: str) -> ProviderEvent:
    if provider == "stripe":
        return stripe_event(body, headers.get("stripe-signature"), secret)
    paypal = api.pipeline.providers.adapter("paypal")
    assert isinstance(paypal, PayPalRefunds)
    return paypal_event(body, headers, secret, paypal)
