"""The shopper's session: a signed cookie (HMAC-SHA256) holding a random id, the one order it may see, and when it
ends; and the CSRF token every form carries, derived from that id. Nothing personal is in the cookie."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

COOKIE = "returns_session"


@dataclass(frozen=True)
class Session:
    sid: str
    order: str | None
    expires: int

    @property
    def fresh(self) -> bool:
        return self.expires > time.time()


def new_session(order: str | None, minutes: int) -> Session:
    """A new id every time: a look-up that succeeds never keeps the id it started with (no fixation)."""
    return Session(secrets.token_urlsafe(18), order, int(time.time()) + 60 * minutes)


def _mac(secret: bytes, payload: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.new(secret, payload, hashlib.sha256).digest()).decode().rstrip("=")


def dump(secret: bytes, session: Session) -> str:
    data = json.dumps({"s": session.sid, "o": session.order, "e": session.expires}, separators=(",", ":"))
    payload = base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")
    return f"{payload}.{_mac(secret, payload.encode())}"


def load(secret: bytes, cookie: str | None) -> Session | None:
    """The session in a cookie, if its signature holds and it has not ended; None otherwise."""
    if not cookie or len(cookie) > 1000 or "." not in cookie:
        return None
    payload, mac = cookie.rsplit(".", 1)
    if not hmac.compare_digest(_mac(secret, payload.encode()), mac):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        found = Session(str(data["s"]), data["o"] if isinstance(data["o"], str) else None, int(data["e"]))
    except (ValueError, KeyError, TypeError):
        return None
    return found if found.fresh else None


def csrf_token(secret: bytes, session: Session) -> str:
    return _mac(secret, b"csrf:" + session.sid.encode())


def csrf_ok(secret: bytes, session: Session | None, token: str | None) -> bool:
    return session is not None and token is not None and hmac.compare_digest(csrf_token(secret, session), token)
