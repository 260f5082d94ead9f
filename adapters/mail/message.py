"""One outbox row's message: headers checked, text + HTML twins rendered, the label PDF attached."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import TemplateError
from pydantic import ValidationError

from models.errors import PermanentError
from models.notices import MessageKind
from models.schemas import EMAIL

if TYPE_CHECKING:
    from adapters.config import Shop

from adapters.mail.templates import _CONTROL, ENV, RenderError

MAIL_POLICY = default_policy.clone(max_line_length=998)


class AttachmentMissing(RenderError):
    """The file the message must carry (the label PDF) is not on disk (yet)."""


class InvalidRecipient(PermanentError):
    """The recipient is not exactly one plain address; the message says so without repeating it (logs)."""



# ---- headers -------------------------------------------------------------------------------------------------

_MESSAGE_ID = re.compile(r"^<[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+>$")


def header_text(value: object, limit: int = 200) -> str:
    """A single-line header value: control characters (CR, LF, ...) removed, whitespace collapsed, bounded."""
    return " ".join(_CONTROL.sub(" ", str(value)).split())[:limit]


def check_recipient(recipient: object) -> str:
    """The recipient as one plain ASCII address (no display name, no list, no CR/LF); InvalidRecipient otherwise."""
    if not isinstance(recipient, str) or _CONTROL.search(recipient) or not recipient.isascii():
        raise InvalidRecipient("recipient is not a single valid address")
    address = recipient.strip()
    try:
        valid = EMAIL.validate_python(address)
    except ValidationError:
        raise InvalidRecipient("recipient is not a single valid address") from None
    # The validator also accepts "Name <addr>" and lowercases the domain: only a bare address passes as given.
    if valid.casefold() != address.casefold():
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


def subject_line(kind: str, context: dict[str, object], shop: Shop) -> str:
    """The Subject header an outbox row's message has (or will have); TemplateError if the context lacks a field."""
    return header_text(ENV.get_template(f"{kind}.subject.j2").render({**context, "shop": shop, "kind": kind}))


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
    if kind not in set(MessageKind):
        raise RenderError(f"unknown message kind {str(kind)[:40]!r}")
    if not isinstance(context, dict):
        raise RenderError("context must be a JSON object")
    to = check_recipient(recipient)
    if not isinstance(message_id, str) or not _MESSAGE_ID.match(message_id):
        raise RenderError("message_id is not of the form <id@domain>")
    values: dict[str, object] = {**context, "shop": shop, "kind": kind}
    try:
        subject = values["subject"] = subject_line(kind, context, shop)
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


