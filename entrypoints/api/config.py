"""The API's settings, from the environment (README, Configuration)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from adapters.files import write_atomic
from models.errors import InvalidInput


def _number(env: dict[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"{name} must be a number, not {text[:20]!r}") from None
    if value <= 0:
        raise InvalidInput(f"{name} must be positive")
    return value


# A run holds its thread until it ends, after the 201 (its email and artifact): with 4, four storefronts sending
# one request after another found every thread busy and sent 7 of 16 runs to the slower worker path (measured).
RUN_THREADS = 8


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    wait_seconds: float = 5.0  # how long POST /v1/returns waits for the request flow before answering 202
    key_rate: float = 20.0  # requests per second per storefront key (and a burst of twice that)
    address_rate: float = 50.0  # requests per second per client address
    max_body: int = 64 * 1024
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)  # signs the shop's cookies
    secure_cookies: bool = False  # set behind HTTPS (RETURNS_COOKIE_SECURE=1)
    session_minutes: int = 30
    run_threads: int = RUN_THREADS  # request runs the API claims and runs itself; beyond them (or at 0) the worker

    @classmethod
    def from_env(cls, home: Path, env: dict[str, str] | None = None) -> ApiConfig:
        """RETURNS_API_HOST, RETURNS_API_PORT, RETURNS_API_WAIT, RETURNS_API_KEY_RATE, RETURNS_API_ADDRESS_RATE,
        RETURNS_COOKIE_SECURE, RETURNS_API_RUN_THREADS; the cookie secret from RETURNS_SESSION_SECRET or a file
        made once under `home`."""
        e = dict(os.environ) if env is None else env
        port = int(_number(e, "RETURNS_API_PORT", 8000))
        threads = e.get("RETURNS_API_RUN_THREADS") or str(RUN_THREADS)
        if not threads.isdigit() or int(threads) > 64:
            raise InvalidInput(f"RETURNS_API_RUN_THREADS must be a whole number from 0 to 64, not {threads[:20]!r}")
        return cls(host=e.get("RETURNS_API_HOST") or "127.0.0.1", port=port,
                   wait_seconds=_number(e, "RETURNS_API_WAIT", 5.0),
                   key_rate=_number(e, "RETURNS_API_KEY_RATE", 20.0),
                   address_rate=_number(e, "RETURNS_API_ADDRESS_RATE", 50.0),
                   secret=(e["RETURNS_SESSION_SECRET"].encode() if e.get("RETURNS_SESSION_SECRET")
                           else session_secret(home)),
                   secure_cookies=e.get("RETURNS_COOKIE_SECURE", "") in ("1", "true", "yes"),
                   run_threads=int(threads))


def session_secret(home: Path) -> bytes:
    """The cookie-signing secret kept under RETURNS_HOME (0600), made on first use: sessions survive a restart."""
    path = home / "session.secret"
    if not path.exists():
        write_atomic(path, secrets.token_hex(32).encode())
    return path.read_bytes().strip()
