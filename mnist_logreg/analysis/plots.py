"""The comparison's figures: learning curves, a heatmap over two swept axes, the spread over seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _label(row: pd.Series, axes: list[str]) -> str:
    return ", ".join(f"{a.split('.')[-1]}={row[a]}" for a in axes) or row["run_id"][:8]


def plot_curves(table: pd.DataFrame, curves, path: Path, axes: list[str]) -> Path:
    """Test accuracy against epoch, a line per run labelled by its values of the swept axes."""
    from ..lifecycle.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for _, row in table.iterrows():
        steps, values = zip(*curves[row["run_id"]]) if curves.get(row["run_id"]) else ((), ())
        ax.plot(steps, values, marker="o", markersize=3, label=_label(row, axes))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    if len(table) <= 20:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_heatmap(table: pd.DataFrame, x: str, y: str, path: Path, averaged: list[str] = ()) -> Path:
    """Final test accuracy over two swept axes (mean where other axes, such as seeds, repeat a cell)."""
    from ..lifecycle.plots import pyplot

    plt = pyplot()
    grid = table.pivot_table(index=y, columns=x, values="test_acc", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    im = ax.imshow(grid.values, cmap="viridis")
    fig.colorbar(im, ax=ax, label="final test accuracy")
    ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
    ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if averaged:
        ax.set_title(f"mean over {', '.join(averaged)}", fontsize=9)
    middle = (grid.values.min() + grid.values.max()) / 2
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            value = grid.values[i, j]
            ax.text(j, i, f"{value:.4f}", ha="center", va="center", fontsize=8,
                    color="black" if value > middle else "white")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_seeds(spread: pd.DataFrame, path: Path) -> Path:
    """Mean final test accuracy per config with a one-standard-deviation bar over seeds."""
    from ..lifecycle.plots import pyplot

    plt = pyplot()
    labels = [", ".join(f"{c.split('.')[-1]}={row[c]}" for c in spread.columns
                        if c not in {"mean", "std", "count"}) for _, row in spread.iterrows()]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(spread)), 4))
    ax.errorbar(range(len(spread)), spread["mean"], yerr=spread["std"].fillna(0), fmt="o", capsize=4)
    ax.set_xticks(range(len(spread)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
