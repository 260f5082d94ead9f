"""Time the RMA label renderer: `python -m bench.label [-n N]`.

Every variant draws the same layout (adapters/label/layout.py) for the same customers; only the font
handling differs, so the numbers isolate what the fonts cost:

  core-font baseline      Helvetica, nothing embedded (Latin-1 only: the speed floor)
  naive TTF, DejaVu       add_font of the full DejaVu Sans + Bold files for every label
  naive TTF, ReturnsSans  the same with the pre-cut fonts/ReturnsSans*.ttf (what subsetting the files buys)
  cached, real bold face  our clone + cut path, embedding the regular and the bold face
  render_label            what the service uses: clone + cut, one embedded face, synthetic bold
  render_label, cold cut  the same with the per-document cut cache emptied before every label

The first label of a process also pays for parsing the font (once); it is reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import date
from itertools import cycle

from adapters.config import Shop
from adapters.label import fonts as F
from adapters.label import layout as L
from models.policy import DEFAULT_POLICY
from models.rma import new_rma

SHOP = Shop()
CUSTOMERS = (
    ("Zoë Łukasiewicz", ("2417 Hypoluxo Rd", "Apt 12B", "Lantana, FL 33462", "United States")),
    ("Ренат Гарипов", ("ул. Баумана, д. 58", "кв. 14", "Казань, Татарстан 420111", "Россия")),
    ("Ngô Bảo Châu", ("18 Hoàng Quốc Việt", "Phường Nghĩa Đô", "Hà Nội, Cầu Giấy 100000", "Việt Nam")),
    ("Σωκράτης Παπαδόπουλος", ("Οδός Ερμού 25", "3ος όροφος", "Αθήνα, Αττική 105 63", "Ελλάδα")),
)


def sample(i: int) -> L.LabelData:
    name, address = CUSTOMERS[i % len(CUSTOMERS)]
    return L.LabelData(
        rma=new_rma(bytes([i % 256, i // 256 % 256, 7, 20, 2, 23])),
        order_number=f"IMG-{104000 + i}",
        customer_name=name,
        address_lines=address,
        lines=(
            L.LabelLine("MAX-SER-1OZ", "MAX Stem Cell Serum 1 oz", 1),
            L.LabelLine("VC-CRM-2OZ", "Vital C Hydrating Repair Crème 2 oz", 2),
        ),
        issued_on=date(2026, 11, 26),
        valid_until=date(2026, 12, 26),
        prepaid=i % 3 == 0,
    )


def measure(render: Callable[[L.LabelData], bytes], n: int, before: Callable[[], None] = lambda: None) -> list[float]:
    data = cycle([sample(i) for i in range(min(n, 64))])
    render(next(data))  # warm-up: imports, first parse
    times = []
    for _ in range(n):
        item = next(data)
        before()
        start = time.perf_counter()
        render(item)
        times.append((time.perf_counter() - start) * 1000)
    return times


def first_label_ms() -> float:
    """A process's first label: parse the face, build the cut, render."""
    F._face.cache_clear()
    F._coverage.cache_clear()
    F._cut.cache_clear()
    start = time.perf_counter()
    L.render_label(sample(0), SHOP)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200, help="labels per variant (default 200)")
    n = parser.parse_args().n

    def build(fonts: F.Fonts) -> Callable[[L.LabelData], bytes]:
        return lambda data: L._build(data, SHOP, DEFAULT_POLICY, fonts)

    dejavu = F.file_fonts(F.FONT_DIR / "DejaVuSans.ttf", F.FONT_DIR / "DejaVuSans-Bold.ttf")
    returns_sans = F.file_fonts(F.FONT_DIR / F.FONT_FILES[""], F.FONT_DIR / F.FONT_FILES["B"])
    first = first_label_ms()
    variants: list[tuple[str, list[float]]] = [
        ("core-font baseline (Helvetica)", measure(build(F.core_fonts()), n)),
        ("naive TTF, DejaVu Sans + Bold", measure(build(dejavu), n)),
        ("naive TTF, ReturnsSans + Bold", measure(build(returns_sans), n)),
        ("cached, real bold face", measure(build(F.cached_fonts(bold_face=True)), n)),
        ("render_label", measure(lambda data: L.render_label(data, SHOP), n)),
        ("render_label, cold cut cache", measure(lambda data: L.render_label(data, SHOP), n, F._cut.cache_clear)),
    ]
    print(f"{n} labels per variant, ms per label")
    print(f"{'variant':34} {'median':>8} {'p95':>8}")
    for name, times in variants:
        times.sort()
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        print(f"{name:34} {statistics.median(times):8.2f} {p95:8.2f}")
    print(f"{'first label in a process':34} {first:8.2f}")


if __name__ == "__main__":
    main()
