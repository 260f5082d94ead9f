"""PNG charts for the returns report, drawn with matplotlib's Agg backend (no display, no GUI toolkit)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # before pyplot: a worker has no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

INK, ACCENT, MUTED, WARN = "#1f3b4d", "#3c8d93", "#b9c7cf", "#c8553d"


@dataclass(frozen=True)
class Bars:
    """One bar chart: labels and values, drawn horizontally when the labels are long."""

    title: str
    labels: Sequence[str]
    values: Sequence[float]
    horizontal: bool = False
    percent: bool = False


def _empty(ax: Axes, title: str) -> None:
    ax.set_title(title, loc="left", fontsize=11, color=INK)
    ax.text(0.5, 0.5, "nothing in this period", ha="center", va="center", color=MUTED, transform=ax.transAxes)
    ax.set_axis_off()


def _bars(ax: Axes, chart: Bars) -> None:
    if not chart.values:
        _empty(ax, chart.title)
        return
    ax.set_title(chart.title, loc="left", fontsize=11, color=INK)
    positions = list(range(len(chart.values)))
    values = [v * 100 for v in chart.values] if chart.percent else list(chart.values)
    if chart.horizontal:
        ax.barh(positions, values, color=ACCENT)
        ax.set_yticks(positions, list(chart.labels), fontsize=8)
        if not chart.percent:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.invert_yaxis()
        if chart.percent:
            ax.set_xlabel("% of units sold")
    else:
        ax.bar(positions, values, color=ACCENT)
        ax.set_xticks(positions, list(chart.labels), fontsize=8, rotation=20, ha="right")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)


def _histogram(ax: Axes, days: Sequence[float], deadline_days: int) -> None:
    title = f"Receipt to processed (days); P8 deadline {deadline_days} days"
    if not days:
        _empty(ax, title)
        return
    ax.set_title(title, loc="left", fontsize=11, color=INK)
    top = max(max(days), deadline_days) + 1
    ax.hist(list(days), bins=[i / 2 for i in range(int(top * 2) + 1)], color=ACCENT)
    ax.axvline(deadline_days, color=WARN, linestyle="--", linewidth=1.5)
    ax.set_xlabel("days")
    ax.set_ylabel("returns")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)


def report_png(panels: Sequence[Bars], days: Sequence[float], deadline_days: int) -> bytes:
    """A grid of bar charts plus the receipt-to-processed histogram, as one PNG."""
    count = len(panels) + 1
    rows = (count + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.4 * rows), dpi=80)
    flat = list(axes.flat)
    try:
        for ax, chart in zip(flat, panels, strict=False):
            _bars(ax, chart)
        _histogram(flat[len(panels)], days, deadline_days)
        for ax in flat[count:]:
            ax.set_axis_off()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def data_uri(png: bytes) -> str:
    """The PNG inline, for a markdown image the Prefect UI shows without fetching anything."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
