"""Plots shared by every experiment (matplotlib, Agg backend: no display needed).

matplotlib is imported on the first plot, not with this module, so commands that never draw (and `saelab --help`)
do not pay for it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saelab.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@functools.cache
def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically and free it (every saelab plot goes through here)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def plot_training_curves(records: Sequence[Mapping[str, float]], path: str | Path, x_key: str = "tokens",
                         keys: Sequence[str] = ("loss", "fvu", "l0", "dead_fraction")) -> Path:
    """One small panel per logged quantity against tokens seen (records from a trainer's metrics.jsonl)."""
    present = [k for k in keys if any(k in r for r in records)]
    fig, axes = pyplot().subplots(1, max(len(present), 1), figsize=(3.6 * max(len(present), 1), 3.0), squeeze=False)
    for ax, key in zip(axes[0], present, strict=False):
        pts = [(r[x_key], r[key]) for r in records if key in r and x_key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key)
        ax.set_xlabel(x_key)
        if key in ("loss", "fvu") and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_lines(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *, xlabel: str,
               ylabel: str, title: str = "", logx: bool = False, logy: bool = False, markers: bool = True,
               dashed: Sequence[str] = (), xticks: Sequence[float] = ()) -> Path:
    """Several named (x, y) series on one axis: frontier plots, sweeps. Series named in `dashed` are drawn as
    dashed lines without markers (fits, reference levels) so they read apart from the measurements. `xticks`
    labels exactly those x values (e.g. the k of a sweep on a log axis) instead of matplotlib's choice."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    for name, (xs, ys) in series.items():
        style = dict(ls="--", marker=None) if name in dashed else dict(marker="o" if markers else None)
        ax.plot(list(xs), list(ys), lw=1.4, label=name, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if xticks:
        ax.set_xticks(list(xticks), [f"{tick:g}" for tick in xticks])
        ax.xaxis.set_minor_locator(pyplot().NullLocator())
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_histogram(values: Sequence[float], path: str | Path, *, xlabel: str, title: str = "", bins: int = 60,
                   logy: bool = True) -> Path:
    fig, ax = pyplot().subplots(figsize=(5.5, 3.4))
    ax.hist(list(values), bins=bins, color="#4477aa")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_heatmap(matrix, path: str | Path, *, xlabel: str, ylabel: str, title: str = "", cmap: str = "viridis",
                 aspect: str = "auto", colorbar: bool = True, xticklabels: Sequence[str] | None = None,
                 yticklabels: Sequence[str] | None = None, annotate: bool = False) -> Path:
    """Banding heatmaps, weight matrices, connector images; small labelled tables of numbers (one tick label per
    column / row, and with `annotate` each cell's value written in it)."""
    fig, ax = pyplot().subplots(figsize=(6.0, 4.2))
    image = ax.imshow(matrix, aspect=aspect, cmap=cmap, interpolation="nearest")
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), list(xticklabels), rotation=30, ha="right")
    if yticklabels is not None:
        ax.set_yticks(range(len(yticklabels)), list(yticklabels))
    if annotate:
        for (row, col), value in np.ndenumerate(np.asarray(matrix, dtype=float)):
            if np.isfinite(value):
                shade = "k" if image.norm(value) > 0.6 else "w"  # dark text on the light end of the colour map
                ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=7, color=shade)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_groups(groups: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, *, ylabel: str,
                title: str = "") -> Path:
    """Distributions side by side: one panel per outer key, one box (with its points) per inner key; e.g. per-latent
    autointerp scores of two SAEs per scorer."""
    fig, axes = pyplot().subplots(1, max(len(groups), 1), figsize=(3.4 * max(len(groups), 1), 3.4), squeeze=False)
    for ax, (panel, series) in zip(axes[0], groups.items(), strict=False):
        names = list(series)
        ax.boxplot([list(series[name]) for name in names], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=15)
        for position, name in enumerate(names, start=1):
            values = list(series[name])
            jitter = np.random.default_rng(position).uniform(-0.12, 0.12, len(values))
            ax.scatter(position + jitter, values, s=8, alpha=0.5)
        ax.set_title(panel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
