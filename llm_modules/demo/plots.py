"""The demos' plots, made to be read at a glance: horizontal bars with each system's full name on the y axis, the
value written at the end of each bar, the legend above the axes (never over a bar), written atomically."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..io import atomic_write


@dataclass
class Series:
    """One metric over the systems: values in [0, 1], optional min-max whiskers (None where there is no value)."""

    label: str
    values: Sequence[float | None]
    low: Sequence[float | None] | None = None
    high: Sequence[float | None] | None = None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(path: Path, names: Sequence[str], series: Sequence[Series], xlabel: str, title: str = "") -> None:
    """Grouped horizontal bars: one group per system (top to bottom in the given order), one bar per series."""
    plt = _pyplot()
    n, k = len(names), len(series)
    bar = 0.8 / k
    fig, ax = plt.subplots(figsize=(10, 1.2 + n * (0.22 * k + 0.18)))
    for j, s in enumerate(series):
        ys = [i + (j - (k - 1) / 2) * bar for i in range(n)]
        vals = [v if v is not None else 0.0 for v in s.values]
        err = None
        if s.low is not None and s.high is not None:
            err = [[v - (lo if lo is not None else v) for v, lo in zip(vals, s.low)],
                   [(hi if hi is not None else v) - v for v, hi in zip(vals, s.high)]]
        ax.barh(ys, vals, bar * 0.92, xerr=err, capsize=2, label=s.label, error_kw={"elinewidth": 0.8})
        for y, v, raw, top in zip(ys, vals, s.values, err[1] if err else [0.0] * n):
            ax.text(min(v + top, 1.0) + 0.01, y, "n/a" if raw is None else f"{v:.0%}", va="center", fontsize=7)
    ax.set_yticks(range(n))
    ax.set_yticklabels([textwrap.fill(name, 44) for name in names], fontsize=8)
    ax.invert_yaxis()  # the first system on top, as in the report's table
    ax.set_xlim(0, 1.08)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}" if v <= 1 else ""))
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=k, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9, pad=22)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_curves(path: Path, curves: dict[str, Sequence[float]], xlabel: str, ylabel: str) -> None:
    """Training-loss curves on a log scale, the legend beside the axes so it covers no curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, ys in curves.items():
        if ys:
            ax.plot([i / max(1, len(ys) - 1) for i in range(len(ys))], ys, label=textwrap.fill(name, 30), lw=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


@dataclass
class Point:
    """One system on a quality-against-cost plot: its cost `x`, its quality `y` in [0, 1] with min-max whiskers."""

    label: str
    x: float
    y: float
    low: float | None = None
    high: float | None = None


def plot_tradeoff(path: Path, points: Sequence[Point], xlabel: str, ylabel: str, title: str = "") -> None:
    """Quality against cost: one marker per system, numbered on the plot and named in a legend beside the axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for i, p in enumerate(points, 1):
        err = None
        if p.low is not None and p.high is not None:
            err = [[p.y - p.low], [p.high - p.y]]
        ax.errorbar([p.x], [p.y], yerr=err, fmt="o", capsize=3, ms=6, label=textwrap.fill(f"{i}. {p.label}", 48))
        ax.annotate(str(i), (p.x, p.y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_xlim(0, max([1.05, *(p.x * 1.05 for p in points)]))
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}" if v <= 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
