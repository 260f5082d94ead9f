"""The RMA label: one US Letter page, a 6 x 4 inch shipping label on top and a packing slip below.

The label carries what P7 asks for (the shop's returns address, the RMA written large, as a
Code 39 barcode and as a QR code, and "write it on the box"), who pays postage (R6 vs P3/P4);
the slip carries the order, the authorized lines, the validity date (R8), what happens next (P8)
and how to reach Customer Care (P9).

`render_label` is pure: the same input gives the same bytes (fixed creation date taken from the
issue date, no clock, no random ids: fpdf2's file /ID is a hash of the content and that date).

Speed (numbers: `python -m bench.label`). This layout with Helvetica costs ~3.5 ms; with DejaVu
Sans + Bold added the naive way it costs ~70 ms, almost all of it font work: parsing each TTF in
`add_font`, then fontTools re-parsing and subsetting it in `output`, where the cost grows with the
number of glyphs in the *input* font. We get to ~8 ms five ways:

1. fonts/ReturnsSans*.ttf are DejaVu Sans pre-cut to Latin / Greek / Cyrillic / Vietnamese
   (fonts/make_returns_sans.py): ~1,850 glyphs instead of ~6,200, no hinting, no layout tables.
2. Each face is parsed by fpdf2 once per process (`_face`); every document gets a cheap clone of
   that parsed `TTFFont` whose only fresh parts are the per-document state (see `_clone_font`).
3. Just before output, the clone's fontTools input is swapped for a small cut of the face holding
   printable ASCII plus the few other glyphs this document uses (`_cut`, LRU-cached: for most
   labels the key is empty or repeats), so fpdf2's own subsetting works on ~100 glyphs, not ~1,850.
   Glyph names are kept in the cut; fpdf2 maps glyphs by name, so the embedded result is the same.
4. That input is opened with recalcBBoxes=False, so saving the subset copies each glyph's bytes
   instead of decompiling and recompiling its outline (bounds stay the whole font's: valid maxima).
5. Only the regular face is embedded; bold is the regular glyphs filled and stroked. An embedded
   face costs ~3.5 ms at output whatever we do (fontTools' per-table overhead, fpdf2's 128 KiB
   CIDToGIDMap), so the real bold face would cost ~11.5 ms a label (`cached_fonts(bold_face=True)`).

Text is sanitised before drawing: NFC, no control or format characters, and any character the
font has no glyph for becomes "?" (we check the font's cmap; fpdf2 would otherwise draw nothing).
"""


from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path

import segno
from fpdf import FPDF
from fpdf.enums import StrokeJoinStyle, TextMode

from adapters.config import Shop
from adapters.crashpoints import crash_point
from adapters.files import write_atomic
from adapters.label.fonts import FAKE_BOLD, Fonts, cached_fonts, clean_text
from models.policy import DEFAULT_POLICY, Policy
from models.rma import is_canonical

# Not strftime("%B"): that follows the process locale, and the bytes must not.
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip

# Geometry, in PDF points (1/72 inch). US Letter is 612 x 792; the label is 6 x 4 in, landscape,
# centred in the top half (5.5 in) so a fold or cut at mid-page keeps it whole.
PAGE_W, PAGE_H = 612.0, 792.0
LABEL_W, LABEL_H = 6 * 72.0, 4 * 72.0
LABEL_X, LABEL_Y = (PAGE_W - LABEL_W) / 2, (PAGE_H / 2 - LABEL_H) / 2
PAD = 12.0
SLIP_X, SLIP_Y, SLIP_W = 54.0, PAGE_H / 2 + 18, PAGE_W - 2 * 54.0
# Code 39: fpdf2's `w` is the wide bar; narrow = w/3, so a symbol (3 wide + 6 narrow + gap) is 16/3 w.
BARCODE_MAX_WIDE = 3.6  # pt: narrow bar 1.2 pt = 17 mil, comfortably above scanners' 7.5 mil minimum
BARCODE_MAX_W = 4 * 72.0 - 2 * PAD  # keep it within 4 in so it also survives a 4 x 6 reprint


@dataclass(frozen=True)
class LabelLine:
    sku: str
    name: str
    quantity: int


@dataclass(frozen=True)
class LabelData:
    rma: str  # canonical, e.g. "RMA-7K2QMXP" (models/rma.py)
    order_number: str
    customer_name: str
    address_lines: tuple[str, ...]  # customer's postal address, already formatted lines
    lines: tuple[LabelLine, ...]  # the authorized lines
    issued_on: date  # RMA issue date (shop's local date); also the PDF creation date
    valid_until: date  # R8
    prepaid: bool  # R6: damage / shipping-error returns: postage paid by the shop



def _long_date(d: date) -> str:
    return f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"


class _Page:
    """Small drawing helpers over one FPDF page, in points, with sanitised text."""

    def __init__(self, pdf: FPDF, fonts: Fonts, covered: Container[int]) -> None:
        self.pdf = pdf
        self.family = fonts.family
        self.bold_face = fonts.bold_face
        self.covered = covered

    def font(self, size: float, bold: bool = False) -> None:
        self.pdf.set_font(self.family, "B" if bold and self.bold_face else "", size)

    def draw(self, x: float, y: float, line: str, bold: bool, color: int) -> None:
        """Draw at the current font; without a bold face, bold = glyphs filled *and* stroked.

        The stroke (FAKE_BOLD of the font size, half of it outside each outline) thickens the
        stems about as much as DejaVu Sans Bold does; the text stays real text for search and copy.
        """
        pdf = self.pdf
        pdf.set_text_color(color)
        if bold and not self.bold_face:
            width = FAKE_BOLD * pdf.font_size_pt
            with pdf.local_context(text_mode=TextMode.FILL_STROKE, line_width=width, draw_color=color):
                pdf.text(x, y, line)
        else:
            pdf.text(x, y, line)

    def fit(self, text: str, width: float, size: float, bold: bool = False, min_size: float = 6.0) -> float:
        """Set the largest font size <= size at which `text` fits `width` (not below min_size)."""
        self.font(size, bold)
        while size > min_size and self.pdf.get_string_width(text) > width:
            size = max(min_size, size - 0.5)
            self.font(size, bold)
        return size

    def text(
        self,
        x: float,
        y: float,
        text: str,
        size: float,
        bold: bool = False,
        width: float | None = None,
        color: int = 0,
    ) -> None:
        """Draw one line with its baseline at y; shrink, then cut with an ellipsis, to stay in `width`."""
        line = clean_text(text, self.covered)
        if width is None:
            self.font(size, bold)
        else:
            self.fit(line, width, size, bold)
            if self.pdf.get_string_width(line) > width:
                ellipsis = "\u2026" if 0x2026 in self.covered else "..."
                while line and self.pdf.get_string_width(line + ellipsis) > width:
                    line = line[:-1]
                line = line.rstrip() + ellipsis
        if line:
            self.draw(x, y, line, bold, color)

    def right(self, x_right: float, y: float, text: str, size: float, bold: bool = False) -> None:
        line = clean_text(text, self.covered)
        self.font(size, bold)
        self.draw(x_right - self.pdf.get_string_width(line), y, line, bold, 0)


# --------------------------------------------------------------------------------------------
# Drawing


def _qr(pdf: FPDF, rows: list[list[int]], x: float, y: float, module: float) -> None:
    """Draw a QR matrix as filled rectangles, one per horizontal run of dark modules.

    Vector rectangles keep the PDF small, sharp at any printer resolution and free of temp files.
    The caller leaves the 4-module quiet zone around it blank.
    """
    for r, row in enumerate(rows):
        c = 0
        while c < len(row):
            if row[c]:
                start = c
                while c < len(row) and row[c]:
                    c += 1
                pdf.rect(x + start * module, y + r * module, (c - start) * module, module, "F")
            else:
                c += 1


def _code39(pdf: FPDF, text: str, x: float, y: float, max_width: float, height: float) -> float:
    """Draw `text` as Code 39 (with its * start/stop), as wide as allowed; returns the width used."""
    symbol = f"*{text}*"
    wide = min(BARCODE_MAX_WIDE, max_width / (len(symbol) * 16 / 3))
    width = len(symbol) * 16 / 3 * wide - wide / 3  # no gap after the stop character
    pdf.code39(symbol, x, y, w=wide, h=height)
    return width


def _draw_label(page: _Page, data: LabelData, shop: Shop) -> None:
    pdf = page.pdf
    x0, y0 = LABEL_X, LABEL_Y
    left, right = x0 + PAD, x0 + LABEL_W - PAD

    # Cut line: the label is 6 x 4 in, so it fits a standard pouch or a 4 x 6 thermal sheet.
    pdf.set_draw_color(0)
    pdf.set_line_width(0.75)
    pdf.set_dash_pattern(dash=5, gap=3)
    pdf.rect(x0, y0, LABEL_W, LABEL_H)
    pdf.set_dash_pattern()
    page.text(x0, y0 - 6, "Cut along the dashed line and tape the label to the box.", 7)

    # Ship from (top left, up to 5 lines) and postage (top right).
    postage_w, postage_h = 150.0, 50.0
    from_w = LABEL_W - 3 * PAD - postage_w
    page.text(left, y0 + PAD + 7, "FROM", 7, bold=True)
    y = y0 + PAD + 19
    for line in [line for line in (data.customer_name, *data.address_lines) if line.strip()][:5]:
        page.text(left, y, line, 9, width=from_w)
        y += 10.5

    px, py = right - postage_w, y0 + PAD
    pdf.set_line_width(1.0)
    if data.prepaid:  # R6: the shop pays; make it impossible to miss
        pdf.set_fill_color(0)
        pdf.rect(px, py, postage_w, postage_h, "F")
        page.text(px + 8, py + 21, "POSTAGE PAID BY", 10, bold=True, width=postage_w - 16, color=255)
        page.text(px + 8, py + 37, shop.name.upper(), 12, bold=True, width=postage_w - 16, color=255)
    else:  # P3 / P4: the customer pays
        pdf.rect(px, py, postage_w, postage_h)
        page.text(px + 8, py + 18, "PLACE POSTAGE HERE", 9, bold=True, width=postage_w - 16)
        page.text(px + 8, py + 34, "Return postage is paid by", 7.5, width=postage_w - 16)
        page.text(px + 8, py + 44, "the customer", 7.5, width=postage_w - 16)

    # Ship to: the shop's returns address (P7), large, indented like a carrier label.
    sep1 = y0 + 82
    pdf.set_line_width(0.5)
    pdf.line(x0, sep1, x0 + LABEL_W, sep1)
    to_x = left + 64
    y = sep1 + 4
    page.text(left, y + 18, "SHIP TO", 9, bold=True)
    for line in shop.returns_address_lines[:4]:
        y += 18
        page.text(to_x, y, line, 15, bold=True, width=right - to_x)

    # RMA (P7): large type and Code 39 on the left, QR on the right.
    sep2 = y + 10
    pdf.line(x0, sep2, x0 + LABEL_W, sep2)
    zone = y0 + LABEL_H - sep2  # height of the RMA strip, up to the label border
    # make_qr, not make: segno would pick a Micro QR for so short a text, which phones do not read.
    qr = [list(row) for row in segno.make_qr(data.rma, error="m").matrix]
    module = zone / (len(qr) + 8)  # 4-module quiet zone on every side, the border counts as ink
    qr_size = module * len(qr)
    qr_x, qr_y = x0 + LABEL_W - 4 * module - qr_size, sep2 + 4 * module
    page.text(left, sep2 + 30, data.rma, 28, bold=True)
    bar_w = min(BARCODE_MAX_W, qr_x - 4 * module - left)
    _code39(pdf, data.rma, left, sep2 + 40, bar_w, 40)
    page.text(left, sep2 + 96, "Write this RMA number on the outside of the box.", 10, bold=True, width=bar_w + 40)
    _qr(pdf, qr, qr_x, qr_y, module)


def _draw_slip(page: _Page, data: LabelData, shop: Shop, policy: Policy) -> None:
    pdf = page.pdf
    left, right = SLIP_X, SLIP_X + SLIP_W
    y = SLIP_Y

    # Fold line between label and slip.
    pdf.set_line_width(0.5)
    pdf.set_dash_pattern(dash=2, gap=3)
    pdf.line(18, PAGE_H / 2, PAGE_W - 18, PAGE_H / 2)
    pdf.set_dash_pattern()

    y += 14
    page.text(left, y, "PACKING SLIP", 16, bold=True)
    page.right(right, y, shop.name, 11, bold=True)
    y += 14
    page.text(left, y, "Put this page inside the box, with the items listed below.", 9)

    y += 22
    facts = (
        ("RMA", data.rma),
        ("Order", data.order_number),
        ("Customer", data.customer_name),
        ("Issued", _long_date(data.issued_on)),
    )
    for label, value in facts:
        page.text(left, y, label, 9, bold=True)
        page.text(left + 70, y, value, 10, bold=label == "RMA", width=SLIP_W - 70)
        y += 14
    y += 4
    page.text(left, y, f"This RMA is valid until {_long_date(data.valid_until)}.", 10, bold=True)  # R8
    y += 12
    page.text(
        left, y, "If we have not received your parcel by then, the RMA expires; you can then request a new one.", 8
    )

    # Authorized lines.
    y += 22
    sku_w, qty_w = 110.0, 40.0
    name_x, qty_x = left + sku_w, right - qty_w
    pdf.set_fill_color(230)
    pdf.rect(left, y - 11, SLIP_W, 15, "F")
    page.text(left + 4, y, "SKU", 9, bold=True)
    page.text(name_x, y, "Product", 9, bold=True)
    page.right(right - 4, y, "Qty", 9, bold=True)
    footer_top = PAGE_H - 118  # the "what next" and Customer Care block below needs this much
    row_h = 14.0
    capacity = int((footer_top - (y + 6)) // row_h)
    shown = data.lines if len(data.lines) <= capacity else data.lines[: max(capacity - 1, 0)]
    for line in shown:
        y += row_h
        page.text(left + 4, y, line.sku, 9, width=sku_w - 10)
        page.text(name_x, y, line.name, 9, width=qty_x - name_x - 6)
        page.right(right - 4, y, str(line.quantity), 9)
    if len(shown) < len(data.lines):
        rest = data.lines[len(shown) :]
        y += row_h
        page.text(name_x, y, f"... and {len(rest)} more line(s), {sum(i.quantity for i in rest)} unit(s)", 9)
    y += 6
    pdf.set_line_width(0.5)
    pdf.line(left, y, right, y)
    y += 12
    page.right(right - 4, y, f"Total units: {sum(line.quantity for line in data.lines)}", 9, bold=True)

    # What happens next (P8), who pays postage (R6 / P3-P4), Customer Care (P9).
    y = footer_top + 14
    page.text(left, y, "What happens next", 11, bold=True)
    y += 14
    page.text(
        left,
        y,
        f"Returns are processed within {policy.processing_days} days of receipt; "
        "you will get an email when it is done.",
        9,
        width=SLIP_W,
    )
    y += 12
    postage = (
        f"Postage for this return is paid by {shop.name}."
        if data.prepaid
        else "Return postage is paid by the customer."
    )
    page.text(left, y, postage, 9, width=SLIP_W)
    y += 22
    page.text(left, y, "Customer Care", 11, bold=True)
    y += 14
    page.text(left, y, f"{shop.care_phone}  |  {shop.care_email}  |  {shop.care_hours}", 9, width=SLIP_W)
    y += 12
    page.text(left, y, "For questions about this return, please have your account number and this RMA ready.", 8)


def _build(data: LabelData, shop: Shop, policy: Policy, fonts: Fonts) -> bytes:
    if not is_canonical(data.rma) or len(data.rma) != len("RMA-7K2QMXP"):
        raise ValueError(f"not a canonical RMA number: {data.rma!r}")
    pdf = FPDF(orientation="P", unit="pt", format="letter")
    pdf.set_auto_page_break(False)
    pdf.set_margins(0, 0, 0)
    # The issue date at local midnight: fixed for a given RMA, and it shows the right day in a viewer.
    pdf.set_creation_date(datetime.combine(data.issued_on, time(0), tzinfo=policy.tz))
    pdf.set_creator(f"{shop.name} returns")
    pdf.set_title(f"Return label {data.rma}")
    covered = fonts.install(pdf)
    pdf.add_page()
    page = _Page(pdf, fonts, covered)
    # Round joins, set once for the page: synthetic bold strokes glyph outlines, and the default
    # miter joins grow spikes on sharp corners (A, M, V). Rectangles do not notice at these widths.
    with pdf.local_context(stroke_join_style=StrokeJoinStyle.ROUND):
        _draw_label(page, data, shop)
        _draw_slip(page, data, shop, policy)
    fonts.finish(pdf)
    return bytes(pdf.output())


def render_label(data: LabelData, shop: Shop, *, policy: Policy = DEFAULT_POLICY) -> bytes:
    """The label PDF. Pure: the same input gives identical bytes (for a given fpdf2 / fontTools).

    `policy` supplies the processing time quoted on the slip (P8) and the time zone of the date.
    ValueError if `data.rma` is not a canonical RMA number.
    """
    return _build(data, shop, policy, cached_fonts())


# --------------------------------------------------------------------------------------------
# Files


def label_path(label_dir: Path, rma: str) -> Path:
    """<label_dir>/<rma>.pdf, and nothing else: ValueError for anything but a canonical RMA."""
    # The length check matters: is_canonical's regex ends in `$`, which also accepts a trailing "\n".
    if not isinstance(rma, str) or len(rma) != len("RMA-7K2QMXP") or not is_canonical(rma):
        raise ValueError(f"not a canonical RMA number: {rma!r}")
    base = Path(label_dir).resolve()
    path = base / f"{rma}.pdf"
    # Belt and braces: also refuses a planted symlink that would lead the write elsewhere.
    if path.resolve().parent != base:
        raise ValueError(f"label path for {rma} escapes {base}")
    return path


def write_label(label_dir: Path, rma: str, pdf: bytes) -> Path:
    """Write the PDF atomically at its confined path (owner-only: it holds an address)."""
    return write_atomic(label_path(label_dir, rma), pdf, before_rename=lambda: crash_point("label.during-write"))
