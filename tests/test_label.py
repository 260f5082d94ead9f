"""The RMA label PDF: content (P7, P8, P9, R6, R8), Unicode, determinism, path confinement, atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from datetime import date
from io import BytesIO
from pathlib import Path

import pytest
from fontTools.ttLib import TTFont
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pypdf import PdfReader

from adapters.config import Shop
from adapters.label import fonts as F
from adapters.label import layout as L
from adapters.label.layout import LabelData, LabelLine, label_path, render_label, write_label
from models.rma import new_rma

SHOP = Shop()
RMA = new_rma(b"\x07\x14\x02\x17\x13\x1d")

CUSTOMERS = {
    "Zoë Łukasiewicz": ("2417 Hypoluxo Rd", "Apt 12B", "Lantana, FL 33462", "United States"),
    "Ренат Гарипов": ("ул. Баумана, д. 58", "кв. 14", "Казань, Татарстан 420111", "Россия"),
    "Ngô Bảo Châu": ("18 Hoàng Quốc Việt", "Phường Nghĩa Đô", "Hà Nội, Cầu Giấy 100000", "Việt Nam"),
    "Σωκράτης Παπαδόπουλος": ("Οδός Ερμού 25", "3ος όροφος", "Αθήνα, Αττική 105 63", "Ελλάδα"),
}


def make_data(name: str = "Zoë Łukasiewicz", *, prepaid: bool = False, **changes: object) -> LabelData:
    data = LabelData(
        rma=RMA,
        order_number="IMG-104233",
        customer_name=name,
        address_lines=CUSTOMERS.get(name, CUSTOMERS["Zoë Łukasiewicz"]),
        lines=(
            LabelLine("MAX-SER-1OZ", "MAX Stem Cell Serum 1 oz", 1),
            LabelLine("VC-CRM-2OZ", "Vital C Hydrating Repair Crème 2 oz", 2),
        ),
        issued_on=date(2026, 11, 26),
        valid_until=date(2026, 12, 26),
        prepaid=prepaid,
    )
    return replace(data, **changes)  # type: ignore[arg-type]


def page_text(pdf: bytes) -> str:
    reader = PdfReader(BytesIO(pdf))
    assert len(reader.pages) == 1
    return reader.pages[0].extract_text()


def flat(text: str) -> str:
    """Whitespace-insensitive form: a sentence may be split over two drawn lines."""
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Content


@pytest.mark.parametrize("name", list(CUSTOMERS))
def test_label_shows_addresses_rma_lines_and_dates(name: str) -> None:
    text = page_text(render_label(make_data(name), SHOP))
    lines = text.splitlines()

    for line in SHOP.returns_address_lines:  # ship-to (P7)
        assert any(line in row for row in lines), line
    assert "7130 Seacrest Blvd" in text and "Lantana, FL 33462" in text
    assert name in lines  # ship-from, exactly as given (NFC, all scripts)
    for line in CUSTOMERS[name]:
        assert line in lines, line
    assert text.count(RMA) >= 2  # label (large type) and packing slip
    assert "Write this RMA number on the outside of the box" in text  # P7
    assert "IMG-104233" in text
    assert "MAX-SER-1OZ MAX Stem Cell Serum 1 oz 1" in text
    assert "VC-CRM-2OZ Vital C Hydrating Repair Crème 2 oz 2" in text
    assert "This RMA is valid until December 26, 2026." in text  # R8
    assert "Returns are processed within 10 days of receipt; you will get an email when it is done" in text  # P8
    for fact in (SHOP.care_phone, SHOP.care_email, SHOP.care_hours):  # P9
        assert fact in text


def test_customer_pays_postage_by_default() -> None:
    text = flat(page_text(render_label(make_data(prepaid=False), SHOP)))
    assert "Return postage is paid by the customer" in text  # P3 / P4
    assert "POSTAGE PAID BY" not in text


def test_prepaid_label_says_the_shop_pays() -> None:
    text = flat(page_text(render_label(make_data(prepaid=True), SHOP)))
    assert "POSTAGE PAID BY IMAGE SKINCARE" in text  # R6
    assert "paid by the customer" not in text


def test_processing_days_follow_the_policy() -> None:
    from models.policy import DEFAULT_POLICY

    policy = replace(DEFAULT_POLICY, processing_days=7)
    assert "processed within 7 days of receipt" in page_text(render_label(make_data(), SHOP, policy=policy))


def test_refuses_a_non_canonical_rma() -> None:
    with pytest.raises(ValueError):
        render_label(make_data(rma="rma-7k2qmxp"), SHOP)


def test_long_text_and_many_lines_stay_on_one_page() -> None:
    lines = tuple(LabelLine(f"SKU-{i:03}", f"Product number {i} " + "x" * 120, 1) for i in range(40))
    data = make_data(customer_name="Zoë " + "Łukasiewicz-" * 30, lines=lines)
    text = page_text(render_label(data, SHOP))  # asserts one page
    assert "\u2026" in text  # the long name was cut with an ellipsis rather than overflowing
    assert "more line(s)" in text
    assert "Total units: 40" in text


def test_barcode_fits_four_inches() -> None:
    from fpdf import FPDF

    pdf = FPDF(unit="pt")
    pdf.add_page()
    width = L._code39(pdf, RMA, 0, 0, L.BARCODE_MAX_W, 30)
    assert width <= 4 * 72 - 24  # within 4 in, with room for the quiet zones
    symbols = len(RMA) + 2  # with the * start / stop
    narrow = width / (symbols * 16 - 1)  # each symbol is 16 narrow units, minus the last gap
    assert narrow * 1000 / 72 >= 7.5  # mil: scanners want at least 7.5


# ---------------------------------------------------------------------------------------------
# Unicode hygiene


def test_unsupported_characters_are_replaced_not_fatal() -> None:
    data = make_data(
        customer_name="Zoë \U0001f600 王小明",
        address_lines=("1 Main St\x00\x07", "\u202eevil\u202c", "Lantana,\tFL 33462", "US\u2028"),
    )
    text = page_text(render_label(data, SHOP))
    assert "Zoë ? ???" in text.splitlines()
    assert "1 Main St" in text.splitlines()
    assert "evil" in text.splitlines()  # bidi override dropped
    assert "Lantana, FL 33462" in text.splitlines()
    assert not any(ord(ch) < 0x20 and ch != "\n" for ch in text)
    assert "\u202e" not in text


def test_clean_text() -> None:
    covered = F._coverage(("",))
    assert F.clean_text("Zoe\u0308", covered) == "Zoë"  # NFC: decomposed input composes
    assert F.clean_text("a\r\nb\tc  d", covered) == "a b c d"
    assert F.clean_text("\u2764\ufe0f x", covered) == "? x"  # variation selector dropped, heart replaced
    assert F.clean_text("\ud800", covered) == "?"  # lone surrogate


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_any_name_renders(name: str) -> None:
    pdf = render_label(make_data(customer_name=name), SHOP)
    assert pdf.startswith(b"%PDF-")
    cleaned = F.clean_text(name, F._coverage(("",)))
    assert all(ord(ch) in F._coverage(("",)) for ch in cleaned)


# ---------------------------------------------------------------------------------------------
# Determinism and the font fast path


def test_same_input_same_bytes() -> None:
    data = make_data("Ngô Bảo Châu", prepaid=True)
    first = render_label(data, SHOP)
    F._cut.cache_clear()  # cold and warm caches must not change the bytes
    assert render_label(data, SHOP) == first
    assert render_label(data, SHOP) == first
    meta = PdfReader(BytesIO(first)).metadata
    assert meta is not None and meta["/CreationDate"].startswith("D:20261126")


def test_same_bytes_in_another_process() -> None:
    """No hash-seed, clock or cache dependence: a fresh interpreter renders the same file."""
    data = make_data("Σωκράτης Παπαδόπουλος")
    code = (
        "import sys, tests.test_label as t; from adapters.label.layout import render_label;"
        "sys.stdout.buffer.write(render_label(t.make_data('Σωκράτης Παπαδόπουλος'), t.SHOP))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, check=True)
    assert out.stdout == render_label(data, SHOP)


def _fonts_and_content(pdf: bytes) -> tuple[bytes, list[tuple[object, object, TTFont]]]:
    page = PdfReader(BytesIO(pdf)).pages[0]
    content = page.get_contents().get_data()  # type: ignore[union-attr]
    fonts = []
    for ref in page["/Resources"]["/Font"].values():  # type: ignore[index]
        font = ref.get_object()
        cid = font["/DescendantFonts"][0].get_object()
        program = TTFont(BytesIO(cid["/FontDescriptor"]["/FontFile2"].get_object().get_data()))
        fonts.append((cid["/W"], font["/ToUnicode"].get_object().get_data(), program))
    return content, fonts


@pytest.mark.parametrize("bold_face", [False, True])
@pytest.mark.parametrize("name", list(CUSTOMERS))
def test_fast_fonts_match_plain_add_font(name: str, bold_face: bool) -> None:
    """The cloned / cut fonts embed the same glyphs as fpdf2's own add_font would, drawn the same way."""
    data = make_data(name)
    bold = F.FONT_DIR / F.FONT_FILES["B"] if bold_face else None
    plain = L._build(data, SHOP, L.DEFAULT_POLICY, F.file_fonts(F.FONT_DIR / F.FONT_FILES[""], bold))
    fast = L._build(data, SHOP, L.DEFAULT_POLICY, F.cached_fonts(bold_face=bold_face))
    plain_content, plain_fonts = _fonts_and_content(plain)
    fast_content, fast_fonts = _fonts_and_content(fast)
    assert fast_content == plain_content
    assert page_text(fast) == page_text(plain)
    assert len(fast_fonts) == len(plain_fonts) == (2 if bold_face else 1)
    for (w1, cmap1, prog1), (w2, cmap2, prog2) in zip(fast_fonts, plain_fonts, strict=True):
        assert w1 == w2 and cmap1 == cmap2
        assert prog1.getGlyphOrder() == prog2.getGlyphOrder()
        glyf1, glyf2 = prog1["glyf"], prog2["glyf"]
        for glyph in prog1.getGlyphOrder():  # composites (Vietnamese marks) must point at the same parts
            g1, g2 = glyf1[glyph], glyf2[glyph]
            assert g1.isComposite() == g2.isComposite(), glyph
            if g1.isComposite():
                assert [c.glyphName for c in g1.components] == [c.glyphName for c in g2.components], glyph
            else:
                assert g1.getCoordinates(glyf1)[0] == g2.getCoordinates(glyf2)[0], glyph
        assert prog1["hmtx"].metrics == prog2["hmtx"].metrics


# ---------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "a/b",
        "RMA-..",
        "RMA-\x00",
        "\x00",
        "/etc/passwd",
        f"/tmp/{RMA}",
        f"../{RMA}",
        f"{RMA}\n",
        "",
        RMA.lower(),
    ],
)
def test_label_path_refuses_anything_but_a_canonical_rma(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        label_path(tmp_path, bad)


def test_label_path_is_confined(tmp_path: Path) -> None:
    assert label_path(tmp_path, RMA) == tmp_path.resolve() / f"{RMA}.pdf"
    with pytest.raises(ValueError):
        label_path(tmp_path, 42)  # type: ignore[arg-type]


def test_label_path_refuses_a_planted_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / f"{RMA}.pdf").symlink_to(elsewhere / "stolen.pdf")
    with pytest.raises(ValueError):
        label_path(labels, RMA)


def test_write_label_is_atomic_and_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    label_dir = tmp_path / "labels"  # created on demand
    pdf = render_label(make_data(), SHOP)
    seen: list[tuple[bytes, bool]] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        # At the moment of the rename the temp file is already complete and the target not yet there.
        seen.append((Path(src).read_bytes(), Path(dst).exists()))
        assert Path(src).parent == Path(dst).parent  # same directory, so the rename is atomic
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    path = write_label(label_dir, RMA, pdf)
    assert path == label_path(label_dir, RMA)
    assert seen == [(pdf, False)]
    assert path.read_bytes() == pdf
    assert sorted(p.name for p in label_dir.iterdir()) == [f"{RMA}.pdf"]

    # Rewriting replaces the whole file in one step, still without leftovers.
    other = render_label(make_data(prepaid=True), SHOP)
    write_label(label_dir, RMA, other)
    assert path.read_bytes() == other
    assert sorted(p.name for p in label_dir.iterdir()) == [f"{RMA}.pdf"]


def test_write_label_failure_keeps_the_old_file_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = render_label(make_data(), SHOP)
    write_label(tmp_path, RMA, old)

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_label(tmp_path, RMA, render_label(make_data(prepaid=True), SHOP))
    assert (tmp_path / f"{RMA}.pdf").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{RMA}.pdf"]


def test_write_label_refuses_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_label(tmp_path, "../escape", b"%PDF-")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The bundled font


@pytest.mark.parametrize("style", list(F.FONT_FILES))
def test_bundled_font_is_renamed_licensed_and_covers_our_scripts(style: str) -> None:
    font = TTFont(F.FONT_DIR / F.FONT_FILES[style])
    names = font["name"]
    assert "ReturnsSans" in names.getDebugName(1)
    for name_id in (1, 3, 4, 6, 16):  # the Bitstream Vera licence: a modified font must not use those names
        assert not any(word in names.getDebugName(name_id) for word in ("Bitstream", "Vera")), name_id
    for name_id in (1, 4, 6, 16):  # and ours does not pass itself off as the real DejaVu Sans either
        assert "DejaVu" not in names.getDebugName(name_id), name_id
    assert "Bitstream" in names.getDebugName(0)  # ... but keeps the copyright notice
    assert "public domain" in names.getDebugName(13)  # ... and the licence text
    cmap = font.getBestCmap()
    wanted = "".join(CUSTOMERS) + "".join(line for address in CUSTOMERS.values() for line in address)
    assert all(ord(ch) in cmap for ch in wanted + "".join(map(chr, F.ALWAYS_IN_CUT)) + "\u2026")
