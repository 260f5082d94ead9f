"""Limits: request rates per storefront key and per client address (token buckets; 429 with Retry-After), and a
cap on request bodies (413), checked before any handler reads one."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from entrypoints.api.problems import Problem, problem


@dataclass
class TokenBucket:
    """`rate` requests a second on average, `burst` at once, per key; in memory, for one API process."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    _state: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key: str) -> float:
        """0 if a request may go now, else the seconds until it may."""
        now = self.clock()
        with self._lock:
            tokens, then = self._state.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= 1:
                self._state[key] = (tokens - 1, now)
                if len(self._state) > 100_000:  # an address flood must not grow memory without bound
                    self._state.clear()
                return 0.0
            self._state[key] = (tokens, now)
            return (1 - tokens) / self.rate

    def check(self, key: str, what: str) -> None:
        """Raise a 429 problem with Retry-After when `key` is over its rate."""
        wait = self.take(key)
        if wait > 0:
            raise Problem(429, f"too many requests from this {what}; retry after the time in Retry-After",
                          "rate-limited", headers={"Retry-After": str(max(1, math.ceil(wait)))})


@dataclass
class FailedLookups:
    """A shopper's failed order look-ups per client address: each one slower than the last, then refused."""

    slow_after: int = 3
    refuse_after: int = 10
    window: float = 900.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _recent(self, client: str) -> list[float]:
        now = self.clock()
        kept = [t for t in self._failures.get(client, []) if now - t < self.window]
        self._failures[client] = kept
        return kept

    def refused_for(self, client: str) -> float:
        """Seconds this client must wait before another look-up (0 when it may try now)."""
        with self._lock:
            recent = self._recent(client)
            return self.window - (self.clock() - recent[0]) if len(recent) >= self.refuse_after else 0.0

    def failed(self, client: str) -> float:
        """Record a failure; the delay to add to this answer (doubling from 0.25 s past `slow_after`, max 4 s)."""
        with self._lock:
            recent = self._recent(client)
            recent.append(self.clock())
            over = len(recent) - self.slow_after
            return 0.0 if over <= 0 else min(4.0, 0.25 * 2 ** (over - 1))


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app sees any of it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
        body, delivered = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return dict(await receive())
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        response = problem(413, f"the request body is larger than {self.limit} bytes", "body-too-large")
        await response(scope, receive, send)
