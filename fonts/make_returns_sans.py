"""Build fonts/ReturnsSans*.ttf: DejaVu Sans cut down to the scripts our customers' names and addresses use.

Why: the label renderer embeds a TrueType font and fontTools re-subsets it for every PDF; working
from a ~1,300-glyph font instead of DejaVu's ~6,200 glyphs makes that step several times cheaper
(see bench/label.py), and the committed files are ~10x smaller than the originals.

Kept: Latin (Basic, Latin-1, Extended-A/B, Extended Additional = Vietnamese), combining marks,
Greek (+ Extended), Cyrillic (+ Supplement), common punctuation, currency and letterlike symbols.
Everything else the renderer replaces with "?" (it checks coverage against this font's cmap).
Dropped: hinting (labels are printed; PDF viewers mostly ignore TrueType hints), and the OpenType
layout / kern tables (fpdf2 only uses them with text shaping, which the label does not turn on).

Licence (fonts/LICENSE-DejaVu.txt, Bitstream Vera terms): a modified font must not be named
"Bitstream" or "Vera". "DejaVu" would be allowed, but we rename the family to "ReturnsSans" anyway
so nobody mistakes this cut-down copy for the real DejaVu Sans (the Arev glyphs' licence, carried
in the font's name record 13, similarly forbids "Arev" / "Tavmjong Bah" names for modified copies).
The copyright and licence name records are kept, as both licences require.

Run from the repository root:  .venv/bin/python fonts/make_returns_sans.py
The output is deterministic for a given fontTools version (the head timestamp is not touched).
"""

from __future__ import annotations

from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTFont

FONTS = Path(__file__).resolve().parent
FAMILY = "ReturnsSans"

UNICODE_RANGES: tuple[tuple[int, int], ...] = (
    (0x0020, 0x007E),  # Basic Latin
    (0x00A0, 0x00FF),  # Latin-1 Supplement
    (0x0100, 0x017F),  # Latin Extended-A (Polish, Czech, Turkish, ...)
    (0x0180, 0x024F),  # Latin Extended-B (Vietnamese horn letters, Romanian comma-below)
    (0x02B0, 0x02FF),  # Spacing modifier letters (apostrophe-like marks in names)
    (0x0300, 0x036F),  # Combining diacritical marks
    (0x0370, 0x03FF),  # Greek and Coptic
    (0x0400, 0x04FF),  # Cyrillic
    (0x0500, 0x052F),  # Cyrillic Supplement
    (0x1E00, 0x1EFF),  # Latin Extended Additional (Vietnamese)
    (0x1F00, 0x1FFF),  # Greek Extended (polytonic)
    (0x2000, 0x206F),  # General punctuation (dashes, quotes, bullets)
    (0x20A0, 0x20CF),  # Currency symbols
    (0x2100, 0x214F),  # Letterlike symbols (No., TM)
)

SOURCES = {
    "DejaVuSans.ttf": ("ReturnsSans.ttf", "Book"),
    "DejaVuSans-Bold.ttf": ("ReturnsSans-Bold.ttf", "Bold"),
}


def _rename(font: TTFont, subfamily: str) -> None:
    """Replace the family names only: copyright (0), version (5), designer (8, 11) and the licence
    records (13, 14, which also carry the Arev glyphs' terms) stay, as both licences require."""
    full = FAMILY if subfamily == "Book" else f"{FAMILY} {subfamily}"
    postscript = FAMILY if subfamily == "Book" else f"{FAMILY}-{subfamily}"
    new = {
        1: FAMILY,
        3: f"{postscript};subset of DejaVu Sans 2.37",
        4: full,
        6: postscript,
        16: FAMILY,
    }
    table = font["name"]
    for record in table.names:
        if record.nameID in new:
            record.string = new[record.nameID]


def build(source: Path, target: Path, subfamily: str) -> None:
    options = subset.Options()
    options.hinting = False
    options.notdef_outline = True
    options.recommended_glyphs = True
    options.glyph_names = True  # keep readable glyph names (post format 2): cheap and easier to debug
    options.name_IDs = ["*"]
    options.name_languages = ["*"]
    options.layout_features = []
    options.drop_tables += ["GSUB", "GPOS", "GDEF", "MATH", "FFTM", "kern", "gasp"]
    font = TTFont(source, recalcTimestamp=False)
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=[cp for lo, hi in UNICODE_RANGES for cp in range(lo, hi + 1)])
    subsetter.subset(font)
    _rename(font, subfamily)
    font.save(target)


def main() -> None:
    for source, (target, subfamily) in SOURCES.items():
        build(FONTS / source, FONTS / target, subfamily)
        print(f"{target}: {(FONTS / target).stat().st_size} bytes")


if __name__ == "__main__":
    main()
