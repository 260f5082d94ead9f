"""Payment gateways behind one interface: refund(key, payment, amount) is idempotent per key."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from adapters.crashpoints import crash_point
from adapters.db import unit_of_work
from models.errors import PermanentError
from models.tables import GatewaySettlement


class Gateway(Protocol):
    def refund(self, *, key: str, payment_id: int, amount_cents: int) -> str:
        """Pay `amount_cents` back to the payment once per `key`; return the gateway's reference."""
        ...


class LedgerGateway:
    """The default gateway: records settled refunds in its own table, in its own transaction, like a provider."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def refund(self, *, key: str, payment_id: int, amount_cents: int) -> str:
        """Idempotent per key: a repeated call returns the first settlement and pays nothing more."""
        existing = self._find(key)
        if existing is None:
            try:
                with unit_of_work(self.engine) as session:
                    session.add(GatewaySettlement(idempotency_key=key, payment_id=payment_id,
                                                  amount_cents=amount_cents, settled_at=datetime.now(UTC)))
            except IntegrityError:
                pass  # a concurrent call with the same key won; read what it settled
            crash_point("gateway.after-settle")
            existing = self._find(key)
        if existing is None:  # pragma: no cover - the insert above or a concurrent one must be visible
            raise PermanentError(f"gateway lost settlement {key}")
        if existing.payment_id != payment_id or existing.amount_cents != amount_cents:
            raise PermanentError(f"gateway key {key} was already used for a different refund")
        return f"ledger-{existing.id}"

    def _find(self, key: str) -> GatewaySettlement | None:
        with unit_of_work(self.engine) as session:
            query = select(GatewaySettlement).where(col(GatewaySettlement.idempotency_key) == key)
            return session.scalars(query).first()
