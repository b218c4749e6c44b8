"""Plots shared by every recipe (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from saelab.io import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_training_curves(records: Sequence[Mapping[str, float]], path: str | Path, x_key: str = "tokens",
                         keys: Sequence[str] = ("loss", "fvu", "l0", "dead_fraction")) -> Path:
    """One small panel per logged quantity against tokens seen (records from a trainer's metrics.jsonl)."""
    present = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(3.6 * max(len(present), 1), 3.0), squeeze=False)
    for ax, key in zip(axes[0], present, strict=False):
        pts = [(r[x_key], r[key]) for r in records if key in r and x_key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key)
        ax.set_xlabel(x_key)
        if key in ("loss", "fvu") and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_lines(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *, xlabel: str,
               ylabel: str, title: str = "", logx: bool = False, logy: bool = False, markers: bool = True) -> Path:
    """Several named (x, y) series on one axis: frontier plots, sweeps."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o" if markers else None, lw=1.4, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_histogram(values: Sequence[float], path: str | Path, *, xlabel: str, title: str = "", bins: int = 60,
                   logy: bool = True) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.hist(list(values), bins=bins, color="#4477aa")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_heatmap(matrix, path: str | Path, *, xlabel: str, ylabel: str, title: str = "", cmap: str = "viridis",
                 aspect: str = "auto", colorbar: bool = True) -> Path:
    """Banding heatmaps, weight matrices, connector images."""
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    image = ax.imshow(matrix, aspect=aspect, cmap=cmap, interpolation="nearest")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _save(fig, path)
