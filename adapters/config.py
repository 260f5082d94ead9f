"""Runtime configuration from the environment, read once per process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class Shop:
    """What customers see of the shop: names, addresses, phone (P7, P9); config, not template text."""

    name: str = "IMAGE Skincare"
    returns_attention: str = "ATTN: RMA Department"
    returns_street: str = "7130 Seacrest Blvd"
    returns_city: str = "Lantana"
    returns_region: str = "FL"
    returns_postal_code: str = "33462"
    returns_country: str = "US"
    care_phone: str = "1-855-791-5800"
    care_email: str = "customercare@imageskincare.com"
    care_hours: str = "Monday-Friday 8:30 AM - 6:00 PM Eastern"
    mail_from: str = "IMAGE Skincare Returns <returns@imageskincare.com>"
    message_id_domain: str = "returns.imageskincare.com"
    returns_page_url: str = "http://127.0.0.1:8000/returns"  # the shopper's pages (RETURNS_PUBLIC_URL + /returns)

    @property
    def returns_address_lines(self) -> tuple[str, ...]:
        return (
            self.name,
            self.returns_attention,
            self.returns_street,
            f"{self.returns_city}, {self.returns_region} {self.returns_postal_code}",
        )


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    smtp_url: str | None
    care_address: str
    shop: Shop = field(default_factory=Shop)

    @property
    def label_dir(self) -> Path:
        return self.home / "labels"

    @property
    def mail_dir(self) -> Path:
        return self.home / "mail"


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Settings from RETURNS_HOME, RETURNS_DATABASE_URL, RETURNS_SMTP_URL, RETURNS_CARE_EMAIL, RETURNS_PUBLIC_URL."""
    e = os.environ if env is None else env
    home = Path(e.get("RETURNS_HOME") or "var").resolve()
    url = e.get("RETURNS_DATABASE_URL") or f"sqlite:///{home / 'returns.db'}"
    public = (e.get("RETURNS_PUBLIC_URL") or "").rstrip("/")
    shop = Shop(returns_page_url=f"{public}/returns") if public else Shop()
    return Settings(
        home=home,
        database_url=url,
        smtp_url=e.get("RETURNS_SMTP_URL") or None,
        care_address=e.get("RETURNS_CARE_EMAIL") or shop.care_email,
        shop=shop,
    )


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process's settings (tests call `settings.cache_clear()` after changing the environment)."""
    return load_settings()
