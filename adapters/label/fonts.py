"""The label's font engine: DejaVu-derived faces parsed once, cut per document, unknown glyphs replaced.

Why it is shaped this way (and the speed numbers) is told in adapters/label/layout.py's docstring.
"""

from __future__ import annotations

import copy
import unicodedata
from collections.abc import Callable, Container
from dataclasses import dataclass
from functools import cache, lru_cache
from io import BytesIO
from pathlib import Path

from fontTools import subset, ttLib  # type: ignore[import-untyped]
from fpdf import FPDF
from fpdf.fonts import SubsetMap, TTFFont

FONT_DIR = Path(__file__).resolve().parent.parent.parent / "fonts"
FAMILY = "ReturnsSans"
FONT_FILES = {"": "ReturnsSans.ttf", "B": "ReturnsSans-Bold.ttf"}  # fpdf2 style -> file
REPLACEMENT = "?"
FAKE_BOLD = 0.06  # stroke width for synthetic bold, as a fraction of the font size
ALWAYS_IN_CUT = range(0x20, 0x7F)  # printable ASCII: most labels need nothing else, so the cut key repeats


# --------------------------------------------------------------------------------------------
# Fonts


@dataclass(frozen=True)
class _Face:
    style: str
    data: bytes  # the TTF file, for `_cut`
    template: TTFFont  # parsed once by fpdf2's own add_font: metrics, cmap, widths, descriptor
    base_glyphs: frozenset[str]  # glyph names of ALWAYS_IN_CUT


@cache
def _face(style: str) -> _Face:
    """Parse one face once per process, through the public `add_font`, so fpdf2 computes everything."""
    path = FONT_DIR / FONT_FILES[style]
    scratch = FPDF()
    scratch.add_font(FAMILY, style, path)
    template = scratch.fonts[f"{FAMILY.lower()}{style}"]
    if not isinstance(template, TTFFont) or template.color_font is not None:
        raise RuntimeError(f"{path} is not the plain TrueType face _clone_font expects")
    template.ttfont.close()  # add_font opened it lazily, holding the file; clones never read it
    base = frozenset(template.cmap[cp] for cp in ALWAYS_IN_CUT if cp in template.cmap)
    return _Face(style=style, data=path.read_bytes(), template=template, base_glyphs=base)


@cache
def _coverage(styles: tuple[str, ...]) -> frozenset[int]:
    """Code points every face can draw (the text helpers do not track which face a string lands in)."""
    return frozenset(set.intersection(*(set(_face(style).template.cmap) for style in styles)))


def _clone_font(face: _Face, index: int) -> TTFFont:
    """A TTFFont for one document, sharing the template's read-only parse results.

    Which attributes are per document follows fpdf2 2.8.9's own `TTFFont.__deepcopy__` and its
    output code: `subset` (glyphs used), `missing_glyphs`, `biggest_size_pt` and `cw` (a
    defaultdict that grows on lookups) change while drawing; `desc` gets the PDF object id and
    name at output; `ttfont` is subset *in place* at output, so it must be a fresh fontTools
    object. tests/test_label.py checks the result against a plain `add_font` document.
    """
    template = face.template
    font = TTFFont.__new__(TTFFont)
    for slot in TTFFont.__slots__:
        if hasattr(template, slot):  # some declared slots (e.g. unicode_range) are never set
            setattr(font, slot, getattr(template, slot))
    font.i = index
    font.ttfont = _open(face.data)  # the whole face: correct as is; cached_fonts' finish swaps in a cut
    font.desc = copy.copy(template.desc)
    font.cw = copy.copy(template.cw)
    font.missing_glyphs = []
    font.biggest_size_pt = 0
    font._hbfont = None
    font.subset = SubsetMap(font)  # last: it reads glyph_ids / cmap / cw of the new font
    return font


@dataclass(frozen=True)
class Fonts:
    """How a document gets its fonts: the family to select and the code points it can draw.

    `render_label` uses `cached_fonts()`; bench/label.py and the tests swap in other strategies
    to measure and cross-check the same layout.
    """

    family: str
    install: Callable[[FPDF], Container[int]]  # adds the fonts, returns the code points they can draw
    finish: Callable[[FPDF], None] = lambda pdf: None  # last step before `output`
    bold_face: bool = True  # False: draw bold as outlined regular glyphs (see _Page.draw)


def _open(data: bytes) -> ttLib.TTFont:
    """A fresh fontTools object for one document's output, which subsets it in place.

    lazy=True: only the table directory is read here. recalcBBoxes=False: saving the subset copies
    glyph bytes instead of decompiling every outline to recompute bounds; head/maxp keep the
    bounds of the bigger font, which stay valid (they are maxima).
    """
    return ttLib.TTFont(BytesIO(data), lazy=True, recalcTimestamp=False, recalcBBoxes=False)


@lru_cache(maxsize=256)
def _cut(style: str, extra: frozenset[str]) -> bytes:
    """The face reduced to printable ASCII plus the `extra` glyphs, glyph names kept (post format 2).

    A pure function of its arguments, so the cache never changes a document's bytes, only its speed.
    256 entries of ~20-40 KB bound the memory.
    """
    face = _face(style)
    options = subset.Options()
    options.glyph_names = True  # fpdf2 finds glyphs by name in the font it subsets
    options.notdef_outline = True
    options.recommended_glyphs = True
    options.name_IDs = ["*"]  # keep the copyright / licence records
    options.name_languages = ["*"]
    font = _open(face.data)
    subsetter = subset.Subsetter(options)
    subsetter.populate(glyphs=sorted(face.base_glyphs | extra))
    subsetter.subset(font)
    out = BytesIO()
    font.save(out)
    return out.getvalue()


def cached_fonts(bold_face: bool = False) -> Fonts:
    """Our fonts: parsed once per process, cloned per document, cut small before output.

    Without `bold_face` (the default) only the regular face is embedded and bold is drawn as
    outlined regular glyphs. Each embedded face costs ~3.5 ms at output (fontTools subsetting,
    fpdf2's 128 KiB CIDToGIDMap) however few glyphs it holds, so one face instead of two is what
    brings a label under 10 ms (bench/label.py measures both).
    """
    styles = ("", "B") if bold_face else ("",)

    def install(pdf: FPDF) -> Container[int]:
        for style in styles:
            pdf.fonts[f"{FAMILY.lower()}{style}"] = _clone_font(_face(style), len(pdf.fonts) + 1)
        return _coverage(styles)

    def finish(pdf: FPDF) -> None:
        """Hand fpdf2's output a cut holding just this document's glyphs (plus ASCII) to subset."""
        for style in styles:
            font = pdf.fonts[f"{FAMILY.lower()}{style}"]
            assert isinstance(font, TTFFont)
            used = frozenset(font.subset.get_all_glyph_names())
            font.ttfont.close()
            font.ttfont = _open(_cut(style, used - _face(style).base_glyphs))

    return Fonts(FAMILY, install, finish, bold_face)


def file_fonts(regular: Path, bold: Path | None = None) -> Fonts:
    """The naive way: `add_font` from files for every document (for the benchmark and the tests)."""

    def install(pdf: FPDF) -> Container[int]:
        pdf.add_font(FAMILY, "", regular)
        if bold is not None:
            pdf.add_font(FAMILY, "B", bold)
        maps = [set(font.cmap) for font in pdf.fonts.values() if isinstance(font, TTFFont)]
        return set.intersection(*maps)

    return Fonts(FAMILY, install, bold_face=bold is not None)


def core_fonts() -> Fonts:
    """Helvetica, no embedding: the speed floor (Latin-1 only; everything else becomes "?")."""
    return Fonts("helvetica", lambda pdf: range(0x20, 0x100))


# --------------------------------------------------------------------------------------------
# Text


def clean_text(text: str, covered: Container[int]) -> str:
    """What we can safely draw of `text`: NFC, one line, nothing invisible, unknown glyphs -> "?"."""
    out: list[str] = []
    for ch in unicodedata.normalize("NFC", text):
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Zl", "Zp") or (cat == "Zs" and ch != " "):
            out.append(" ")  # tabs, newlines, no-break and other spaces: a plain space keeps words apart
        elif cat == "Cf" or 0xFE00 <= ord(ch) <= 0xFE0F or 0xE0100 <= ord(ch) <= 0xE01EF:
            continue  # bidi overrides, zero-width joiners, variation selectors: invisible or spoofing
        elif ord(ch) in covered:
            out.append(ch)
        else:
            out.append(REPLACEMENT)  # emoji, CJK, lone surrogates, private use...
    return " ".join("".join(out).split())
