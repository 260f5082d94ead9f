"""Outbox emails: Jinja2 rendering (HTML + text twins) and the transports that deliver them (file, SMTP)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import smtplib
import ssl
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateError, Undefined, select_autoescape
from markupsafe import Markup

from models.errors import PermanentError, TransientError
from models.money import format_usd
from models.policy import DEFAULT_POLICY
from service.files import write_atomic
from service.outbox import KINDS

if TYPE_CHECKING:
    from service.config import Settings, Shop

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
# Headers are not folded below SMTP's 998-octet limit: folding at 78 makes Python move a whole short subject to a
# continuation line, which some readers show with a leading space.
MAIL_POLICY = default_policy.clone(max_line_length=998)

PAYMENT_METHOD_NAMES = {
    "amex": "American Express",
    "visa": "Visa",
    "mastercard": "Mastercard",
    "discover": "Discover",
    "paypal": "PayPal",
    "apple_pay": "Apple Pay",
    "afterpay": "Afterpay",
}


# ---- errors --------------------------------------------------------------------------------------------------


class RenderError(PermanentError):
    """The message cannot be built from its stored context (missing variable, bad value, unknown kind)."""


class AttachmentMissing(RenderError):
    """The file the message must carry (the label PDF) is not on disk (yet)."""


class InvalidRecipient(PermanentError):
    """The recipient is not exactly one plain address; the message says so without repeating it (logs)."""


class TransientMailError(TransientError):
    """Delivery may work later: server down, connection dropped, 4xx."""


class TransportUnavailable(TransientMailError):
    """The transport cannot be reached at all, so every other message would fail the same way now."""


class PermanentMailError(PermanentError):
    """The server refused this message for good (5xx on the recipient or the content)."""


# ---- filters -------------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _known(value: object) -> None:
    """A filter given a missing variable raises the template's UndefinedError (names it), not a ValueError."""
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()


def _amount(value: object) -> Decimal:
    _known(value)
    if isinstance(value, Decimal):
        return value
    if isinstance(value, str):
        try:
            amount = Decimal(value)
        except InvalidOperation:
            raise ValueError(f"not a decimal amount: {value[:20]!r}") from None
        if amount.is_finite():
            return amount
    raise ValueError(f"money must be a decimal string, got {type(value).__name__}")


def money(value: object) -> str:
    """"48.6" -> "$48.60"; floats and nulls are refused, never guessed."""
    return format_usd(_amount(value))


def _as_date(value: object) -> date:
    _known(value)
    if isinstance(value, datetime):
        return DEFAULT_POLICY.local_date(value) if value.tzinfo else value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        if "T" in value or " " in value.strip():
            return _as_date(datetime.fromisoformat(value))
        return date.fromisoformat(value)
    raise ValueError(f"not a date: {type(value).__name__}")


def long_date(value: object) -> str:
    """"2026-11-26" -> "November 26, 2026" (datetimes: the shop's calendar day)."""
    day = _as_date(value)
    return f"{day:%B} {day.day}, {day.year}"


def long_datetime(value: object) -> str:
    """An aware ISO datetime in the shop's time zone: "November 26, 2026 at 3:05 PM ET"."""
    _known(value)
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise ValueError("expected an aware ISO datetime")
    local = moment.astimezone(DEFAULT_POLICY.tz)
    hour = local.hour % 12 or 12
    return f"{long_date(local.date())} at {hour}:{local.minute:02d} {'AM' if local.hour < 12 else 'PM'} ET"


def payment_method(value: object) -> str:
    _known(value)
    method = str(value)
    return PAYMENT_METHOD_NAMES.get(method, method.replace("_", " ").title())


def payment_line(payment: object) -> str:
    """{"method": "visa", "last4": "4242", "amount": "48.60"} -> "Visa ending 4242: $48.60"."""
    _known(payment)
    if not isinstance(payment, dict):
        raise ValueError("a payment must be an object")
    method, last4, amount = payment["method"], payment["last4"], payment["amount"]
    ending = f" ending {last4}" if last4 else ""
    return f"{payment_method(method)}{ending}: {money(amount)}"


CONDITIONS = ("unopened", "opened", "damaged", "missing")


def condition_counts(line: object) -> str:
    """A received line's unit counts: "1 unopened, 1 opened" (R12)."""
    _known(line)
    if not isinstance(line, dict):
        raise ValueError("a received line must be an object")
    counts = [(int(line[c]), c) for c in CONDITIONS]
    return ", ".join(f"{n} {c}" for n, c in counts if n) or "nothing recorded"


def policy_refs(clauses: object) -> str:
    """["P3", "R1"] -> "policy P3, R1" (an empty list gives "")."""
    _known(clauses)
    if isinstance(clauses, str) or not isinstance(clauses, list | tuple):
        raise ValueError("clauses must be a list of clause ids")
    ids = [str(c) for c in clauses]
    return f"policy {', '.join(ids)}" if ids else ""


def is_positive(value: object) -> bool:
    return _amount(value) > 0


def _finalize(value: object) -> object:
    """Every printed value: a null is a data bug (never print "None"); control characters become spaces."""
    if value is None:
        raise ValueError("a template printed a null value")
    if isinstance(value, str) and not isinstance(value, Markup):
        return _CONTROL.sub(" ", value)
    return value


def _build_environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(enabled_extensions=("html", "htm", "xml", "html.j2"), default=False),
        undefined=StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    environment.filters.update(
        money=money,
        date=long_date,
        datetime=long_datetime,
        payment_method=payment_method,
        payment=payment_line,
        conditions=condition_counts,
        policy=policy_refs,
    )
    environment.tests["positive"] = is_positive
    return environment


ENV = _build_environment()


# ---- headers -------------------------------------------------------------------------------------------------

_ADDRESS = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)
_MESSAGE_ID = re.compile(r"^<[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+>$")


def header_text(value: object, limit: int = 200) -> str:
    """A single-line header value: control characters (CR, LF, ...) removed, whitespace collapsed, bounded."""
    return " ".join(_CONTROL.sub(" ", str(value)).split())[:limit]


def check_recipient(recipient: object) -> str:
    """The recipient as one plain ASCII address (no display name, no list, no CR/LF); InvalidRecipient otherwise."""
    if not isinstance(recipient, str) or _CONTROL.search(recipient):
        raise InvalidRecipient("recipient is not a single valid address")
    address = recipient.strip()
    local, _, domain = address.rpartition("@")
    if len(address) > 254 or len(local) > 64 or not _ADDRESS.match(address) or not domain:
        raise InvalidRecipient("recipient is not a single valid address")
    return address


# ---- rendering -----------------------------------------------------------------------------------------------


def _label(home: Path, label_file: object) -> tuple[bytes, str]:
    """The label PDF's bytes and file name; it must be a relative path inside `home`."""
    if not isinstance(label_file, str) or not label_file or _CONTROL.search(label_file):
        raise RenderError("label_file must be a path relative to RETURNS_HOME")
    root = home.resolve()
    path = (root / label_file).resolve()
    if Path(label_file).is_absolute() or not path.is_relative_to(root):
        raise RenderError("label_file points outside RETURNS_HOME")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AttachmentMissing(f"label file {label_file} does not exist") from None
    except OSError as exc:
        raise RenderError(f"label file {label_file} cannot be read: {type(exc).__name__}") from None
    if not data.startswith(b"%PDF-"):
        raise RenderError(f"label file {label_file} is not a PDF")
    return data, header_text(path.name, 80)


def render(
    kind: str,
    context: dict[str, object],
    *,
    recipient: str,
    message_id: str,
    shop: Shop,
    home: Path,
    date: datetime | None = None,
) -> EmailMessage:
    """One outbox row's message: text + HTML twins (+ label PDF for rma_issued); RenderError if anything is missing."""
    if kind not in KINDS:
        raise RenderError(f"unknown message kind {str(kind)[:40]!r}")
    if not isinstance(context, dict):
        raise RenderError("context must be a JSON object")
    to = check_recipient(recipient)
    if not isinstance(message_id, str) or not _MESSAGE_ID.match(message_id):
        raise RenderError("message_id is not of the form <id@domain>")
    values: dict[str, object] = {**context, "shop": shop, "kind": kind}
    try:
        subject = header_text(ENV.get_template(f"{kind}.subject.j2").render(values))
        values["subject"] = subject
        text = ENV.get_template(f"{kind}.txt.j2").render(values)
        html = ENV.get_template(f"{kind}.html.j2").render(values)
    except TemplateError as exc:  # UndefinedError, TemplateNotFound, syntax errors
        raise RenderError(f"{kind}: {type(exc).__name__}: {exc}") from None
    except KeyError as exc:  # a filter missed a field
        raise RenderError(f"{kind}: missing field {exc}") from None
    except (ValueError, TypeError, ArithmeticError) as exc:  # a filter refused a value
        raise RenderError(f"{kind}: bad value: {exc}") from None
    if not subject or not text.strip():
        raise RenderError(f"{kind}: rendered an empty subject or body")

    msg = EmailMessage(policy=MAIL_POLICY)
    msg["From"] = header_text(shop.mail_from)
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = message_id
    if date is not None and date.tzinfo is None:
        raise RenderError("the Date header needs an aware datetime")
    msg["Date"] = format_datetime(date or datetime.now(UTC))
    msg.set_content(text, subtype="plain", charset="utf-8")
    msg.add_alternative(html, subtype="html", charset="utf-8")
    if kind == "rma_issued":
        data, filename = _label(home, context.get("label_file"))
        msg.add_attachment(data, maintype="application", subtype="pdf", filename=filename)
    return msg


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
