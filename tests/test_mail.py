"""Email rendering (every kind, both twins, escaping, strictness, headers) and the file and SMTP transports."""

from __future__ import annotations

import copy
import datetime as dt
import ssl
from collections.abc import Iterator
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from jinja2 import StrictUndefined

from adapters.config import Settings, Shop
from adapters.mail import templates
from adapters.mail.message import AttachmentMissing, InvalidRecipient, render
from adapters.mail.templates import RenderError
from adapters.mail.transport import (
    FileTransport,
    PermanentMailError,
    SmtpTransport,
    TransientMailError,
    TransportUnavailable,
    eml_name,
    transport_from_settings,
)
from models.errors import PermanentError, TransientError
from models.notices import CUSTOMER_KINDS, EMAIL_KINDS
from service.outbox import message_id_for
from tests.helpers import free_port
from tests.smtp_server import Inbox

# A shop whose contact details differ from the published ones: proves templates take them from config (P9).
SHOP = Shop(
    care_phone="1-800-555-0199",
    care_email="care-desk@shop.example",
    care_hours="Tuesday-Saturday 9:00 AM - 5:00 PM Eastern",
    mail_from="Test Shop Returns <returns@shop.example>",
    message_id_domain="returns.shop.example",
)
RMA = "RMA-7K2QMXP"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
AT = dt.datetime(2026, 11, 26, 15, 0, tzinfo=dt.UTC)  # when these messages go out

CUSTOMER = {"customer_name": "Dana Whitfield", "order_number": "IS-100234", "account": "ACC-5521", "rma": RMA,
            "return_id": 17}
CARE = {"rma": RMA, "order_number": "IS-100234", "return_id": 17}

SAMPLES: dict[str, dict[str, Any]] = {
    "rma_issued": CUSTOMER | {
        "lines": [
            {"sku": "VC-SERUM-30", "name": "Vital C Hydrating Serum", "quantity": 1, "refund": "48.60",
             "restocking_fee": "0.00", "basis": "P3", "clauses": ["P3", "R1", "R3"]},
            {"sku": "MD-RETINOL", "name": "MD Restoring Retinol Creme", "quantity": 2, "refund": "1180.00",
             "restocking_fee": "240.00", "basis": "P4", "clauses": ["P4", "R2", "R4"]},
        ],
        "declined_lines": [
            {"sku": "TRIAL", "name": "Vital C Trial Kit", "quantity": 1, "reason": "A trial kit cannot be returned.",
             "clauses": ["P2"]},
        ],
        "refund_total": "1228.60", "valid_until": "2026-12-26", "prepaid": False, "reason": "unwanted",
        "resolution": "refund", "label_file": f"labels/{RMA}.pdf",
    },
    "declined": CUSTOMER | {
        "rma": None,
        "lines": [
            {"sku": "VC-SERUM-30", "name": "Vital C Hydrating Serum", "quantity": 1, "clauses": ["P1"],
             "reason": "This order was bought from an authorized partner."},
            {"sku": "TEE", "name": "IMAGE T-shirt", "quantity": 1, "reason": "A tshirt cannot be returned.",
             "clauses": ["P2"]},
            {"sku": "BALM", "name": "Lip Complex", "quantity": 1, "clauses": ["P5", "R6"],
             "reason": "Damage and shipping errors must be reported within 48 hours of delivery."},
            {"sku": "CLEAN", "name": "Gel Cleanser", "quantity": 1, "clauses": ["P4", "R2"],
             "reason": "A return after 30 days needs an expiration date on or after 2027-11-26."},
            {"sku": "ODD", "name": "Mystery Jar", "quantity": 1, "reason": "Something unusual.", "clauses": []},
        ],
        "summary": "This request is declined (see each line's reason).",
    },
    "received": CUSTOMER | {
        "received_on": "2026-12-01", "process_by": "2026-12-11",
        "lines": [
            {"sku": "VC-SERUM-30", "name": "Vital C Hydrating Serum", "unopened": 1, "opened": 0, "damaged": 0,
             "missing": 0},
            {"sku": "MD-RETINOL", "name": "MD Restoring Retinol Creme", "unopened": 1, "opened": 1, "damaged": 0,
             "missing": 0},
        ],
    },
    "processed": CUSTOMER | {
        "lines": [
            {"sku": "VC-SERUM-30", "name": "Vital C Hydrating Serum", "quantity": 1, "price": "45.00", "tax": "3.60",
             "restocking_fee": "0.00", "refund": "48.60", "replacement_units": 0, "note": "Refund for unopened units."},
            {"sku": "MD-RETINOL", "name": "MD Restoring Retinol Creme", "quantity": 2, "price": "60.00",
             "tax": "4.80", "restocking_fee": "12.00", "refund": "52.80", "replacement_units": 0,
             "note": "1 unopened unit(s) refunded; 1 opened and 0 missing unit(s) earn no refund (R12)."},
        ],
        "refund_total": "101.40",
        "payments": [{"method": "visa", "last4": "4242", "amount": "80.00"},
                     {"method": "apple_pay", "last4": None, "amount": "21.40"}],
        "resolution": "refund",
    },
    "expired": CUSTOMER | {"valid_until": "2026-12-26"},
    "review_needed": CARE | {"rma": None, "reasons": ["MD-RETINOL: no expiration date is recorded for this lot"]},
    "due_soon": CARE | {"received_on": "2026-12-01", "deadline": "2026-12-11T15:04:00+00:00", "state": "received"},
    "overdue": CARE | {"received_on": "2026-12-01", "deadline": "2026-12-11T15:04:00+00:00", "state": "processing"},
    "escalated": CARE | {"why": "a pipeline run for it failed, so it will not move on by itself", "state": "received",
                         "received_on": "2026-12-01", "deadline": "2026-12-11T15:04:00+00:00", "refund_total": "48.60",
                         "flow_run_id": "0f3c2a52-8e0b-4a53-9a55-3d1f0c9e2b71",
                         "lines": [{"sku": "VC-SERUM-30", "quantity": 1, "decision": "authorized"}]},
}

# Keys each kind's templates need; anything missing must fail the render (never a blank email).
REQUIRED = {
    "rma_issued": ["customer_name", "order_number", "account", "rma", "lines", "declined_lines", "refund_total",
                   "valid_until", "prepaid", "resolution", "label_file"],
    "declined": ["customer_name", "order_number", "account", "rma", "lines"],
    "received": ["customer_name", "order_number", "account", "rma", "received_on", "process_by", "lines"],
    "processed": ["customer_name", "order_number", "account", "rma", "lines", "refund_total", "payments",
                  "resolution"],
    "expired": ["customer_name", "order_number", "account", "rma", "valid_until"],
    "review_needed": ["rma", "order_number", "return_id", "reasons"],
    "due_soon": ["rma", "order_number", "return_id", "received_on", "deadline", "state"],
    "overdue": ["rma", "order_number", "return_id", "received_on", "deadline", "state"],
    "escalated": ["rma", "order_number", "return_id", "why", "state", "received_on", "deadline", "refund_total",
                  "flow_run_id", "lines"],
}
SUBJECTS = {
    "rma_issued": f"Your return {RMA} is authorized",
    "declined": "About your return request for order IS-100234",
    "received": f"We've received your return {RMA}",
    "processed": f"Your refund of $101.40 for return {RMA} is on its way",
    "expired": f"Your return authorization {RMA} has expired",
    "review_needed": "Review needed: return #17 (order IS-100234)",
    "due_soon": f"Due soon: {RMA} must be processed by December 11, 2026 at 10:04 AM ET",
    "overdue": f"OVERDUE: {RMA} passed its processing deadline (December 11, 2026 at 10:04 AM ET)",
    "escalated": f"Escalated: {RMA} (order IS-100234) needs Customer Care now",
}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / f"{RMA}.pdf").write_bytes(PDF)
    return tmp_path


def build(kind: str, home: Path, context: dict[str, Any] | None = None, recipient: str = "dana@example.com",
          key: str | None = None) -> EmailMessage:
    return render(kind, copy.deepcopy(SAMPLES[kind]) if context is None else context, recipient=recipient,
                  message_id=message_id_for(key or f"17:{kind}", SHOP.message_id_domain), shop=SHOP, home=home,
                  date=AT)


def parts(msg: EmailMessage) -> tuple[str, str]:
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def reparse(msg: EmailMessage) -> EmailMessage:
    parsed = BytesParser(policy=email_policy.default).parsebytes(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
    assert isinstance(parsed, EmailMessage)
    return parsed


# ---- rendering ---------------------------------------------------------------------------------------------


def test_every_kind_has_text_html_and_subject_templates() -> None:
    assert set(SAMPLES) == set(EMAIL_KINDS)
    for kind in EMAIL_KINDS:
        for suffix in ("html.j2", "txt.j2", "subject.j2"):
            assert (templates.TEMPLATES / f"{kind}.{suffix}").is_file(), f"{kind}.{suffix}"


def test_one_strict_autoescaping_environment() -> None:
    assert templates.ENV.undefined is StrictUndefined
    assert templates.ENV.autoescape("rma_issued.html.j2") is True  # type: ignore[operator]
    assert templates.ENV.autoescape("rma_issued.txt.j2") is False  # type: ignore[operator]
    assert templates.ENV.autoescape("rma_issued.subject.j2") is False  # type: ignore[operator]


@pytest.mark.parametrize("kind", sorted(EMAIL_KINDS))
def test_each_kind_is_text_then_html_with_headers_and_care_contact(kind: str, home: Path) -> None:
    msg = reparse(build(kind, home))
    assert msg["Subject"] == SUBJECTS[kind]
    assert msg["To"] == "dana@example.com"
    assert msg["From"] == SHOP.mail_from
    assert msg["Message-ID"] == message_id_for(f"17:{kind}", SHOP.message_id_domain)
    assert msg["Date"].datetime == AT
    alternative = next(p for p in msg.walk() if p.get_content_type() == "multipart/alternative")
    assert [p.get_content_type() for p in alternative.iter_parts()] == ["text/plain", "text/html"]
    text, html = parts(msg)
    for body in (text, html):
        assert SHOP.care_phone in body and SHOP.care_email in body and SHOP.care_hours in body  # P9, from config
        assert "1-855-791-5800" not in body  # nothing hard-coded in the templates
        assert "None" not in body
    assert html.lstrip().startswith("<!DOCTYPE html>")
    if kind in CUSTOMER_KINDS:
        assert text.startswith("Hi Dana Whitfield,") and "Hi Dana Whitfield," in html
        assert "ACC-5521" in text
    else:
        assert text.startswith("Hello Customer Care,")
        assert "Dana" not in text  # Customer Care gets ids, not the customer's personal data


def test_rma_issued_says_how_to_ship_and_carries_the_label(home: Path) -> None:
    msg = reparse(build("rma_issued", home))
    assert msg.get_content_type() == "multipart/mixed"
    attachments = list(msg.iter_attachments())
    assert len(attachments) == 1
    assert attachments[0].get_content_type() == "application/pdf"
    assert attachments[0].get_filename() == f"{RMA}.pdf"
    assert attachments[0].get_content() == PDF
    text, html = parts(msg)
    for body in (text, html):
        assert RMA in body
        assert "(policy P7)" in body  # RMA on the outside of the box
        assert "December 26, 2026" in body and "(policy R8)" in body
        assert "within 10 days" in body and "(policy P8)" in body
        assert "shipping cost is yours" in body  # not prepaid: the customer pays postage
        for line in Shop().returns_address_lines:
            assert line in body
        assert "$48.60" in body and "$1,180.00" in body and "$240.00 restocking fee" in body
        assert "$1,228.60" in body
        assert "A trial kit cannot be returned." in body and "(policy P2)" in body
    assert "OUTSIDE of the box" in text
    assert "outside of the box" in html


def test_rma_issued_prepaid_says_the_shop_pays_postage(home: Path) -> None:
    context = copy.deepcopy(SAMPLES["rma_issued"]) | {"prepaid": True, "resolution": "replacement",
                                                      "refund_total": "0.00", "declined_lines": []}
    context["lines"] = [{"sku": "BALM", "name": "Lip Complex", "quantity": 1, "refund": "0.00",
                         "restocking_fee": "0.00", "basis": "P5", "clauses": ["P5", "R6"]}]
    text, html = parts(build("rma_issued", home, context))
    for body in (text, html):
        assert "postage is on us" in body and "(policy R6)" in body
        assert "shipping cost is yours" not in body
        assert "replacement" in body
        assert "Expected refund" not in body


def test_declined_explains_each_line_and_what_to_do_instead(home: Path) -> None:
    text, html = parts(build("declined", home))
    assert "spa, doctor's office or retailer where you bought it" in text  # P1
    assert "decision is final" in text  # P2
    assert "still request a standard return" in text  # P5 late
    assert "at least a year left before its expiration date" in text  # P4 / R2
    assert "call Customer Care" in text  # generic
    assert "(policy P1)" in text and "(policy P5, R6)" in text and "(policy P4, R2)" in text
    assert "spa, doctor's office or retailer where you bought it" in html
    assert "RMA number" not in text  # no RMA on a declined request: only the account number is asked for


def test_received_and_processed_show_counts_amounts_and_payments(home: Path) -> None:
    text, _ = parts(build("received", home))
    assert "December 1, 2026" in text and "December 11, 2026" in text
    assert "1 unopened, 1 opened" in text and "(policy R12)" in text
    text, html = parts(build("processed", home))
    for body in (text, html):
        assert "Visa ending 4242: $80.00" in body
        assert "Apple Pay: $21.40" in body
        assert "$101.40" in body and "$12.00 restocking fee" in body


def test_processed_replacement_and_exchange(home: Path) -> None:
    context = copy.deepcopy(SAMPLES["processed"]) | {"resolution": "replacement", "refund_total": "0.00",
                                                     "payments": []}
    context["lines"] = [{"sku": "BALM", "name": "Lip Complex", "quantity": 2, "price": "0.00", "tax": "0.00",
                         "restocking_fee": "0.00", "refund": "0.00", "replacement_units": 2,
                         "note": "2 replacement unit(s) shipped."}]
    msg = build("processed", home, context)
    assert msg["Subject"] == f"Your replacement for return {RMA} is on its way"
    text, _ = parts(msg)
    assert "Replacement: 2 shipped" in text and "Refunded to" not in text
    context |= {"resolution": "exchange", "refund_total": "4.00",
                "payments": [{"method": "visa", "last4": "1111", "amount": "4.00"}]}
    context["lines"][0] |= {"quantity": 1, "refund": "4.00", "replacement_units": 1}
    msg = build("processed", home, context)
    assert msg["Subject"] == f"Your exchange for return {RMA} is complete"
    text, _ = parts(msg)
    assert "Correct item: 1 shipped" in text and "Price difference refunded: $4.00" in text
    assert "$0.00 + $0.00 tax" not in text and "Visa ending 1111: $4.00" in text


def test_customer_name_is_escaped_in_html(home: Path) -> None:
    evil = "<img src=x onerror=alert(1)>"
    context = copy.deepcopy(SAMPLES["declined"]) | {"customer_name": evil}
    context["lines"][0]["name"] = "<script>alert(2)</script>"
    text, html = parts(build("declined", home, context))
    assert "<img" not in html and "<script>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in html
    assert f"Hi {evil}," in text  # plain text carries it verbatim, where it is inert


TEXT_FIELDS = {"customer_name", "order_number", "account", "rma", "name", "sku", "reason", "note", "state", "last4"}


def _poison(value: Any, marker: str) -> Any:
    """Every free-text leaf of a context replaced by markup."""
    if isinstance(value, dict):
        return {k: (marker if k in TEXT_FIELDS and v is not None else _poison(v, marker)) for k, v in value.items()}
    if isinstance(value, list):
        return [marker if isinstance(v, str) else _poison(v, marker) for v in value]
    return value


@pytest.mark.parametrize("kind", sorted(EMAIL_KINDS))
def test_every_free_text_field_is_escaped_in_html(kind: str, home: Path) -> None:
    marker = '<i class="x">O\'Neil & co</i>'
    context = _poison(copy.deepcopy(SAMPLES[kind]), marker)
    context["reasons"] = [marker] if "reasons" in context else None
    if context["reasons"] is None:
        del context["reasons"]
    if kind == "rma_issued":
        context["label_file"] = SAMPLES[kind]["label_file"]
    text, html = parts(build(kind, home, context))
    assert "<i" not in html
    assert "&lt;i class=&#34;x&#34;&gt;O&#39;Neil &amp; co&lt;/i&gt;" in html
    assert marker in text


@pytest.mark.parametrize(("kind", "key"), [(k, key) for k, keys in REQUIRED.items() for key in keys])
def test_a_missing_variable_fails_the_render(kind: str, key: str, home: Path) -> None:
    context = copy.deepcopy(SAMPLES[kind])
    del context[key]
    with pytest.raises(RenderError):
        build(kind, home, context)


@pytest.mark.parametrize(("kind", "field"), [("rma_issued", "refund"), ("declined", "reason"),
                                             ("received", "missing"), ("processed", "note")])
def test_a_missing_line_field_fails_the_render(kind: str, field: str, home: Path) -> None:
    context = copy.deepcopy(SAMPLES[kind])
    del context["lines"][-1][field]
    with pytest.raises(RenderError):
        build(kind, home, context)


@pytest.mark.parametrize(("key", "value"), [("rma", None), ("refund_total", 48.6), ("valid_until", "soon"),
                                            ("customer_name", None)])
def test_null_float_and_garbage_values_fail_the_render(key: str, value: object, home: Path) -> None:
    context = copy.deepcopy(SAMPLES["rma_issued"]) | {key: value}
    with pytest.raises(RenderError):
        build("rma_issued", home, context)


def test_unknown_kind_fails(home: Path) -> None:
    with pytest.raises(RenderError):
        render("../../etc/passwd", {}, recipient="a@example.com", message_id="<a@b>", shop=SHOP, home=home)
    with pytest.raises(RenderError):
        render("refund_sent", {}, recipient="a@example.com", message_id="<a@b>", shop=SHOP, home=home)


def test_missing_label_is_a_permanent_error(home: Path) -> None:
    (home / "labels" / f"{RMA}.pdf").unlink()
    with pytest.raises(AttachmentMissing) as info:
        build("rma_issued", home)
    assert isinstance(info.value, PermanentError)


@pytest.mark.parametrize("label", ["../outside.pdf", "/etc/passwd", "labels/../../outside.pdf", "", None,
                                   "labels/not-a-pdf.txt"])
def test_label_must_be_a_pdf_inside_home(label: object, home: Path) -> None:
    (home.parent / "outside.pdf").write_bytes(PDF)
    (home / "labels" / "not-a-pdf.txt").write_text("hello")
    context = copy.deepcopy(SAMPLES["rma_issued"]) | {"label_file": label}
    with pytest.raises(RenderError) as info:
        build("rma_issued", home, context)
    assert not isinstance(info.value, AttachmentMissing)  # a bad path is permanent; only "not there yet" may wait


def test_header_injection_through_the_context_creates_no_header(home: Path) -> None:
    context = copy.deepcopy(SAMPLES["declined"]) | {"customer_name": "Eve\r\nBcc: x@y",
                                                    "order_number": "IS-1\r\nBcc: x@y\nX-Evil: 1"}
    msg = reparse(build("declined", home, context))
    assert msg["Bcc"] is None and msg["X-Evil"] is None
    assert set(msg.keys()) == {"From", "To", "Subject", "Message-ID", "Date", "MIME-Version", "Content-Type"}
    assert "\n" not in msg["Subject"] and "\r" not in msg["Subject"]
    assert msg["Subject"] == "About your return request for order IS-1 Bcc: x@y X-Evil: 1"


@pytest.mark.parametrize("recipient", [
    "dana@example.com\r\nBcc: x@y", "dana@example.com\n", "dana@example.com, eve@example.com",
    "Dana <dana@example.com>", "dana", "", "dana@", "@example.com", "dana@exa mple.com", "dana@@example.com",
    "dana@example.com;eve@example.com", None,
])
def test_recipient_must_be_one_plain_address(recipient: Any, home: Path) -> None:
    with pytest.raises(InvalidRecipient) as info:
        build("expired", home, recipient=recipient)
    assert "example.com" not in str(info.value)  # the error is logged: it never repeats the address


def test_message_id_must_be_well_formed(home: Path) -> None:
    with pytest.raises(RenderError):
        render("expired", SAMPLES["expired"], recipient="a@example.com", message_id="<x@y>\r\nBcc: z@w",
               shop=SHOP, home=home)


def test_filters() -> None:
    assert templates.money("1234.5") == "$1,234.50"
    assert templates.money("0") == "$0.00"
    for bad in (1.5, None, "abc", "NaN"):
        with pytest.raises(ValueError):
            templates.money(bad)
    assert templates.long_date("2026-11-26") == "November 26, 2026"
    assert templates.long_date("2026-11-27T03:00:00+00:00") == "November 26, 2026"  # the shop's calendar day
    assert templates.long_datetime("2026-07-01T16:30:00+00:00") == "July 1, 2026 at 12:30 PM ET"
    assert templates.payment_method("amex") == "American Express"
    assert templates.policy_refs(["P3", "R1"]) == "policy P3, R1"


# ---- file transport ----------------------------------------------------------------------------------------


def test_file_transport_writes_one_parseable_eml_per_message_id(home: Path, tmp_path: Path) -> None:
    spool = tmp_path / "mail"
    transport = FileTransport(spool)
    msg = build("rma_issued", home)
    transport.send(msg)
    transport.send(msg)  # a resend overwrites the same file
    transport.send(build("expired", home))
    files = sorted(spool.iterdir())
    assert len(files) == 2 and all(f.suffix == ".eml" for f in files)
    path = transport.path_for(msg["Message-ID"])
    assert path.name == eml_name(msg["Message-ID"])
    parsed = BytesParser(policy=email_policy.default).parsebytes(path.read_bytes())
    assert parsed["Message-ID"] == msg["Message-ID"]
    assert parsed["Subject"] == SUBJECTS["rma_issued"]
    text, html = parts(parsed)  # type: ignore[arg-type]
    assert "Dana Whitfield" in text and "<!DOCTYPE html>" in html
    assert [a.get_content() for a in parsed.iter_attachments()] == [PDF]  # type: ignore[attr-defined]


def test_file_transport_error_is_transient(home: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(TransientMailError):
        FileTransport(blocker).send(build("expired", home))


def test_transport_from_settings(tmp_path: Path) -> None:
    base = Settings(home=tmp_path, database_url="sqlite://", smtp_url=None, care_address="care@example.com")
    assert transport_from_settings(base) == FileTransport(tmp_path / "mail")
    smtp = Settings(home=tmp_path, database_url="sqlite://", smtp_url="smtp://u:p@mail.example:587",
                    care_address="care@example.com")
    transport = transport_from_settings(smtp)
    assert isinstance(transport, SmtpTransport) and transport.starttls and transport.host == "mail.example"


# ---- SMTP --------------------------------------------------------------------------------------------------


def test_smtp_url_parsing() -> None:
    t = SmtpTransport.from_url("smtp://user%40x:p%40ss%3Aw@mail.example:587")
    assert (t.host, t.port, t.starttls, t.implicit_tls, t.username, t.password, t.timeout) == (
        "mail.example", 587, True, False, "user@x", "p@ss:w", 10.0)
    assert "p@ss" not in repr(t)
    assert SmtpTransport.from_url("smtp://mail.example").port == 25
    assert not SmtpTransport.from_url("smtp://mail.example:2525").starttls
    assert SmtpTransport.from_url("smtp://mail.example:2525?starttls=1").starttls
    assert not SmtpTransport.from_url("smtp://mail.example:587?starttls=0").starttls
    s = SmtpTransport.from_url("smtps://u:p@mail.example")
    assert (s.port, s.implicit_tls, s.starttls) == (465, True, False)
    for bad in ("http://mail.example", "smtp://", "smtp://h?starttls=maybe"):
        with pytest.raises(ValueError):
            SmtpTransport.from_url(bad)


@pytest.fixture
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield inbox, controller.port
    finally:
        controller.stop()


def test_smtp_delivers_the_message(smtp_server: tuple[Inbox, int], home: Path) -> None:
    inbox, port = smtp_server
    msg = build("rma_issued", home)
    SmtpTransport.from_url(f"smtp://127.0.0.1:{port}").send(msg)
    [(mail_from, rcpts, _)] = inbox.messages
    assert mail_from == "returns@shop.example" and rcpts == ["dana@example.com"]
    [got] = [m for _, m in inbox.received()]
    assert got["Message-ID"] == msg["Message-ID"]
    assert [a.get_content() for a in got.iter_attachments()] == [PDF]


def test_smtp_rejected_recipient_is_permanent_and_busy_is_transient(smtp_server: tuple[Inbox, int],
                                                                     home: Path) -> None:
    inbox, port = smtp_server
    transport = SmtpTransport.from_url(f"smtp://127.0.0.1:{port}")
    with pytest.raises(PermanentMailError) as rejected:
        transport.send(build("expired", home, recipient="reject@example.com"))
    assert "550" in str(rejected.value)
    with pytest.raises(TransientMailError) as busy:
        transport.send(build("expired", home, recipient="later@example.com"))
    assert "451" in str(busy.value) and not isinstance(busy.value, TransportUnavailable)
    assert inbox.messages == []


def test_smtp_down_is_transport_unavailable(home: Path) -> None:
    with pytest.raises(TransportUnavailable) as info:
        SmtpTransport.from_url(f"smtp://127.0.0.1:{free_port()}").send(build("expired", home))
    assert isinstance(info.value, TransientError)


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"relay", b"s3cret")
    return AuthResult(success=ok, handled=False)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smtp_login(home: Path) -> None:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port(), authenticator=_authenticator,
                            auth_required=True, auth_require_tls=False)
    controller.start()
    try:
        SmtpTransport.from_url(f"smtp://relay:s3cret@127.0.0.1:{controller.port}").send(build("expired", home))
        assert len(inbox.messages) == 1
        with pytest.raises(TransportUnavailable) as info:
            SmtpTransport.from_url(f"smtp://relay:wrong@127.0.0.1:{controller.port}").send(build("expired", home))
        assert "535" in str(info.value)
        assert len(inbox.messages) == 1
    finally:
        controller.stop()


def test_starttls_not_offered_never_sends_credentials_in_clear(smtp_server: tuple[Inbox, int], home: Path) -> None:
    inbox, port = smtp_server
    with pytest.raises(TransportUnavailable, match="STARTTLS"):
        SmtpTransport.from_url(f"smtp://u:p@127.0.0.1:{port}?starttls=1").send(build("expired", home))
    SmtpTransport.from_url(f"smtp://127.0.0.1:{port}?starttls=1").send(build("expired", home))  # no creds: fine
    assert len(inbox.messages) == 1


def _self_signed(tmp_path: Path) -> tuple[Path, Path, bytes]:
    x509 = pytest.importorskip("cryptography.x509")
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, pem


def test_starttls_and_login_over_tls(home: Path, tmp_path: Path) -> None:
    cert_path, key_path, pem = _self_signed(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert_path, key_path)
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port(), tls_context=server_tls,
                            require_starttls=True, authenticator=_authenticator, auth_required=True)
    controller.start()
    try:
        client_tls = ssl.create_default_context(cadata=pem.decode())
        url = f"smtp://relay:s3cret@127.0.0.1:{controller.port}?starttls=1"
        SmtpTransport.from_url(url, ssl_context=client_tls).send(build("expired", home))
        assert len(inbox.messages) == 1
        with pytest.raises(TransportUnavailable):  # an untrusted certificate is not accepted
            SmtpTransport.from_url(url).send(build("expired", home))
        assert len(inbox.messages) == 1
    finally:
        controller.stop()
