"""The shopper's pages (placeholder until they are built)."""

from typing import Any


def add_shop(app: Any, api: Any) -> None:
    """Add the shopper's pages to `app`."""
