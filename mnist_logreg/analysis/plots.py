"""The comparison's figures: learning curves, a heatmap over two swept axes, the spread over seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _label(row: pd.Series, axes: list[str]) -> str:
    return ", ".join(f"{a.split('.')[-1]}={row[a]}" for a in axes) or row["run_id"][:8]


# The runs a learning-curves plot marks as the best, by final test accuracy.
BEST_MARKED = 3


def plot_curves(table: pd.DataFrame, curves, path: Path, axes: list[str]) -> Path:
    """Test accuracy against epoch. Small sweeps: a line per run, labelled. Larger ones: a colour per
    value of the first swept axis (with a legend), a panel per value of the second, the other axes as
    lines of the same colour; the best runs are drawn thicker and starred at their last epoch."""
    from matplotlib.ticker import MaxNLocator

    from ..lifecycle.plots import pyplot

    plt = pyplot()
    best = set(table.dropna(subset=["test_acc"]).nlargest(BEST_MARKED, "test_acc")["run_id"])
    small = len(table) <= 12 or not axes
    colour_axis = None if small else axes[0]
    panel_axis = axes[1] if not small and len(axes) >= 2 else None
    panels = sorted(table[panel_axis].dropna().unique()) if panel_axis else [None]
    colours = sorted(table[colour_axis].dropna().unique()) if colour_axis else []
    palette = plt.get_cmap("viridis", max(2, len(colours)))
    fig, grid = plt.subplots(1, len(panels), figsize=(min(4.2 * len(panels), 17), 4.6), sharey=True, squeeze=False)
    for ax, panel in zip(grid[0], panels):
        rows = table if panel is None else table[table[panel_axis] == panel]
        for _, row in rows.iterrows():
            steps, values = zip(*curves[row["run_id"]]) if curves.get(row["run_id"]) else ((), ())
            starred = row["run_id"] in best
            colour = palette(colours.index(row[colour_axis])) if colour_axis else None
            ax.plot(steps, values, color=colour, linewidth=2.4 if starred else 0.9, alpha=1.0 if starred else 0.7,
                    marker="o" if small else None, markersize=3, label=_label(row, axes) if small else None)
            if starred and steps:
                ax.plot(steps[-1], values[-1], marker="*", markersize=13, color=colour or "black",
                        markeredgecolor="black", zorder=5)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if panel is not None:
            ax.set_title(f"{panel_axis} = {panel}", fontsize=9)
    grid[0][0].set_ylabel("test accuracy")
    if small:
        grid[0][0].legend(fontsize=7, loc="lower right")
    else:
        handles = [plt.Line2D([], [], color=palette(i), linewidth=2) for i in range(len(colours))]
        fig.legend(handles, [f"{colour_axis} = {c}" for c in colours], fontsize=8, loc="lower center",
                   ncol=min(len(colours), 8), frameon=False)
    fig.suptitle(f"test accuracy per epoch; \u2605 the best {min(BEST_MARKED, len(best))} by final test_acc",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if not small else 0, 1, 0.95))
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
