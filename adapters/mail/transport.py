"""Transports that deliver a built message: a file spool (default) and SMTP (STARTTLS, implicit TLS, login)."""

from __future__ import annotations

import contextlib
import hashlib
import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from adapters.files import write_atomic
from adapters.mail.message import header_text
from models.errors import PermanentError, TransientError

if TYPE_CHECKING:
    from adapters.config import Settings


class TransientMailError(TransientError):
    """Delivery may work later: server down, connection dropped, 4xx."""


class TransportUnavailable(TransientMailError):
    """The transport cannot be reached at all, so every other message would fail the same way now."""


class PermanentMailError(PermanentError):
    """The server refused this message for good (5xx on the recipient or the content)."""



# ---- transports ----------------------------------------------------------------------------------------------


class Transport(Protocol):
    def send(self, msg: EmailMessage) -> None:
        """Deliver or raise TransientMailError / PermanentMailError."""


def eml_name(message_id: str) -> str:
    """The spool file name for a Message-ID: the same message always lands in the same file."""
    return hashlib.sha256(message_id.encode()).hexdigest()[:32] + ".eml"


@dataclass(frozen=True)
class FileTransport:
    """Writes one .eml per Message-ID into `mail_dir`, atomically; a resend overwrites its own file."""

    mail_dir: Path

    def path_for(self, message_id: str) -> Path:
        return self.mail_dir / eml_name(message_id)

    def send(self, msg: EmailMessage) -> None:
        message_id = msg["Message-ID"]
        if not message_id:
            raise PermanentMailError("message has no Message-ID")
        data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
        try:
            write_atomic(self.path_for(str(message_id)), data)  # same Message-ID, same file: a resend overwrites
        except OSError as exc:
            raise TransientMailError(f"cannot write the mail spool: {type(exc).__name__}") from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class SmtpTransport:
    """SMTP submission: smtps:// is implicit TLS; smtp:// uses STARTTLS when asked (?starttls=1, or port 587)."""

    host: str
    port: int
    implicit_tls: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 10.0
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_url(cls, url: str, *, ssl_context: ssl.SSLContext | None = None) -> SmtpTransport:
        """smtp://user:pass@host:port[?starttls=1|0&timeout=10] or smtps://user:pass@host:port."""
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("RETURNS_SMTP_URL must look like smtp://user:pass@host:port or smtps://...")
        implicit = parts.scheme == "smtps"
        port = parts.port or (465 if implicit else 25)
        query = {k: v[-1].lower() for k, v in parse_qs(parts.query).items()}
        flag = query.get("starttls")
        if flag is not None and flag not in _TRUE | _FALSE:
            raise ValueError("starttls must be 1 or 0")
        starttls = not implicit and (flag in _TRUE if flag is not None else port == 587)
        timeout = float(query.get("timeout", "10"))
        return cls(
            host=parts.hostname,
            port=port,
            implicit_tls=implicit,
            starttls=starttls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            timeout=timeout,
            ssl_context=ssl_context,
        )

    def _context(self) -> ssl.SSLContext:
        return self.ssl_context or ssl.create_default_context()

    def _open(self) -> smtplib.SMTP:
        """A ready session (connected, TLS as configured, logged in); TransportUnavailable on any failure."""
        smtp: smtplib.SMTP | None = None
        try:
            if self.implicit_tls:
                smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=self._context())
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            smtp.ehlo()
            if self.starttls:
                if smtp.has_extn("starttls"):
                    smtp.starttls(context=self._context())
                    smtp.ehlo()
                elif self.username:
                    raise TransportUnavailable("the SMTP server does not offer STARTTLS; credentials not sent in clear")
            if self.username:
                smtp.login(self.username, self.password or "")
            return smtp
        except TransportUnavailable:
            _close(smtp)
            raise
        except smtplib.SMTPResponseException as exc:
            _close(smtp)
            raise TransportUnavailable(f"SMTP session refused: {exc.smtp_code} {_text(exc.smtp_error)}") from None
        except (smtplib.SMTPException, OSError) as exc:  # refused, timeout, TLS failure, dropped
            _close(smtp)
            raise TransportUnavailable(f"SMTP server unreachable: {type(exc).__name__}: {exc}") from None

    def send(self, msg: EmailMessage) -> None:
        smtp = self._open()
        try:
            refused = smtp.send_message(msg)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            detail = "; ".join(f"{code} {_text(text)}" for code, text in exc.recipients.values())
            if codes and all(code >= 500 for code in codes):
                raise PermanentMailError(f"recipient rejected: {detail}") from None
            raise TransientMailError(f"recipient deferred: {detail}") from None
        except smtplib.SMTPSenderRefused as exc:  # the envelope sender is configuration: not this message's fault
            raise TransientMailError(f"sender refused: {exc.smtp_code} {_text(exc.smtp_error)}") from None
        except smtplib.SMTPResponseException as exc:
            text = f"{exc.smtp_code} {_text(exc.smtp_error)}"
            if exc.smtp_code >= 500:
                raise PermanentMailError(f"message rejected: {text}") from None
            raise TransientMailError(f"message deferred: {text}") from None
        except smtplib.SMTPNotSupportedError as exc:
            raise PermanentMailError(f"message not supported by the server: {exc}") from None
        except (smtplib.SMTPException, OSError) as exc:  # dropped mid-transaction: outcome unknown, resend
            raise TransientMailError(f"connection lost while sending: {type(exc).__name__}: {exc}") from None
        finally:
            _quit(smtp)
        if refused:
            raise PermanentMailError("recipient rejected: " + "; ".join(f"{c} {_text(t)}" for c, t in refused.values()))


def _text(value: bytes | str) -> str:
    raw = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return header_text(raw, 300)


def _close(smtp: smtplib.SMTP | None) -> None:
    if smtp is not None:
        with contextlib.suppress(OSError):
            smtp.close()


def _quit(smtp: smtplib.SMTP) -> None:
    """End the session; the message's fate is already decided, so errors here are ignored."""
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        _close(smtp)


def transport_from_settings(settings: Settings) -> Transport:
    """SMTP when RETURNS_SMTP_URL is set, else the file spool under RETURNS_HOME/mail."""
    if settings.smtp_url:
        return SmtpTransport.from_url(settings.smtp_url)
    return FileTransport(settings.mail_dir)
