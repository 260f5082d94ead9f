"""A real SMTP server on loopback for the mail tests (aiosmtpd), and what it received."""

from __future__ import annotations

import threading
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from aiosmtpd.controller import Controller

from tests.helpers import free_port


class Inbox:
    """An aiosmtpd handler that keeps what it accepts; rcpt 'reject*' gets 550, 'later*' gets 451."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if address.startswith("reject"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if address.startswith("later"):
            return "451 4.3.0 Mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 Message accepted for delivery"

    def received(self) -> list[tuple[list[str], EmailMessage]]:
        """Each accepted message with its recipients, parsed."""
        with self.lock:
            return [(rcpts, BytesParser(policy=email_policy.default).parsebytes(raw))  # type: ignore[misc]
                    for _, rcpts, raw in self.messages]

    def message_ids(self) -> list[str]:
        return [str(msg["Message-ID"]) for _, msg in self.received()]


class SmtpServer:
    """A server on a free loopback port that a test can start late or stop early ('SMTP down, then up')."""

    def __init__(self, handler: Any, port: int | None = None, url_query: str = "") -> None:
        self.handler = handler
        self.port = port or free_port()
        self.url_query = url_query
        self.controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}{self.url_query}"

    def start(self) -> None:
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
