"""The one clock: every entry point asks it for "now"; the pure domain never does (it is handed `now`)."""

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
