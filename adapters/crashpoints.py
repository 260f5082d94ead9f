"""Named crash points for the crash suite: `crash_point("process.after-pay")` kills this process with SIGKILL
when RETURNS_CRASH_AT names it, and does nothing otherwise.

RETURNS_CRASH_AT=<name> dies at the first hit of <name>; <name>@N dies at its N-th hit in this process (so a
batch can die after its first item). The variable is read once per process and cached: in production, where it
is unset, a crash point costs one function call and one comparison.

SIGKILL, not an exception: no `finally`, no rollback handler, no atexit, no flush runs - the process is gone the
way a power cut or the OOM killer takes it, and only what was committed (or fsynced) before survives.

The points (each sits between a side effect and the commit that records it, or right after a commit):

| name | where | what has happened / not yet |
|---|---|---|
| request.after-commit | Pipeline.request | decision + RMA + outbox row committed; label not rendered, nothing sent |
| label.during-write | label.write_label | temp file written and fsynced; not yet renamed into place |
| receive.after-commit | Pipeline.receive | receipt committed (received); not claimed for processing |
| process.after-claim | Pipeline.claim | received -> processing (lease) committed; nothing paid |
| process.before-pay | Pipeline.pay | refund planned; no gateway call made |
| gateway.after-settle | LedgerGateway.refund | one settlement committed by the gateway (N-th: one per payment) |
| provider.after-refund | service.refunds | Stripe, PayPal or Afterpay answered; our attempt row not written |
| process.after-pay | Pipeline.pay | gateway paid every allocation; our refund not recorded |
| process.after-commit | Pipeline.complete | refund + completed + 'processed' outbox row committed; nothing sent |
| sweep.mid | Pipeline.expire / .escalate | at the start of each; `sweep.mid@2` dies after the first of a batch |
| relay.after-send | relay.relay | message handed to the transport; row not marked sent |
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "RETURNS_CRASH_AT"

POINTS = (
    "request.after-commit",
    "label.during-write",
    "receive.after-commit",
    "process.after-claim",
    "process.before-pay",
    "gateway.after-settle",
    "provider.after-refund",
    "process.after-pay",
    "process.after-commit",
    "sweep.mid",
    "relay.after-send",
)

_UNSET = object()
_target: object = _UNSET  # (name, n) or None, read from the environment on first use
_hits: Counter[str] = Counter()


def parse(spec: str | None) -> tuple[str, int] | None:
    """"name" -> (name, 1); "name@3" -> (name, 3); empty or unset -> None. ValueError for a bad count."""
    if not spec:
        return None
    name, _, count = spec.partition("@")
    n = int(count) if count else 1
    if not name or n < 1:
        raise ValueError(f"{ENV} must be <name> or <name>@<N> with N >= 1, got {spec!r}")
    return name, n


def _load() -> tuple[str, int] | None:
    global _target
    if _target is _UNSET:
        _target = parse(os.environ.get(ENV))
    return _target  # type: ignore[return-value]


def reset() -> None:
    """Forget the cached setting and the hit counts (tests that change the environment in-process)."""
    global _target
    _target = _UNSET
    _hits.clear()


def crash_point(name: str) -> None:
    """Die by SIGKILL here if RETURNS_CRASH_AT names this point (at its N-th hit); otherwise do nothing."""
    target = _target if _target is not _UNSET else _load()
    if target is None or target[0] != name:  # type: ignore[index]
        return
    _hits[name] += 1
    if _hits[name] == target[1]:  # type: ignore[index]
        os.kill(os.getpid(), signal.SIGKILL)
