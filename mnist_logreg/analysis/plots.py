"""The comparison's figures: learning curves, a heatmap over two swept axes, the spread over seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _label(row: pd.Series, axes: list[str]) -> str:
    return ", ".join(f"{a.split('.')[-1]}={row[a]}" for a in axes) or row["run_id"][:8]


# The runs a learning-curves plot marks as the best, by final test accuracy.
BEST_MARKED = 3
LEGEND_ENTRY_IN, LEGEND_ROW_IN = 1.9, 0.22  # a legend entry's width and a row's height below the panels, inches


def plot_curves(table: pd.DataFrame, curves, path: Path, axes: list[str]) -> Path:
    """Test accuracy against epoch. Small sweeps: a line per run, labelled. Larger ones: a colour per
    value of the first swept axis (with a legend), a panel per value of the second, the other axes as
    lines of the same colour; the best runs are drawn thicker and starred at their last epoch."""
    from matplotlib.ticker import MaxNLocator

    from ..lifecycle.plots import pyplot

    plt = pyplot()
    finished = table[table["status"] == "FINISHED"] if "status" in table else table
    best = set(finished["run_id"].head(BEST_MARKED))  # the comparison's first rows: its ranking and tie rule
    small = len(table) <= 12 or not axes
    colour_axis = None if small else axes[0]
    panel_axis = axes[1] if not small and len(axes) >= 2 else None
    style_axis = axes[2] if not small and len(axes) >= 3 else None
    panels = sorted(table[panel_axis].dropna().unique()) if panel_axis else [None]
    colours = sorted(table[colour_axis].dropna().unique()) if colour_axis else []
    styles = sorted(table[style_axis].dropna().unique()) if style_axis else []
    dashes = ["-", "--", ":", "-."]
    palette = plt.get_cmap("viridis", max(2, len(colours)))
    trained = [v for rid in table["run_id"] for s, v in curves.get(rid, []) if s > 0]
    if max((s for rid in table["run_id"] for s, _ in curves.get(rid, [])), default=0) < 2:
        trained = []  # one epoch: the line from the untrained step is all there is
    width = min(4.2 * len(panels), 17)
    entries = len(colours) + len(styles)  # the legend below the panels (a large sweep's)
    per_row = max(1, min(entries, 8, int(width / LEGEND_ENTRY_IN)))
    legend_rows = 0 if small else -(-entries // per_row)
    fig, grid = plt.subplots(1, len(panels), figsize=(width, 4.6 + LEGEND_ROW_IN * max(0, legend_rows - 1)), sharey=True,
                             squeeze=False)
    for ax, panel in zip(grid[0], panels):
        rows = table if panel is None else table[table[panel_axis] == panel]
        for _, row in rows.iterrows():
            steps, values = zip(*curves[row["run_id"]]) if curves.get(row["run_id"]) else ((), ())
            starred = row["run_id"] in best
            colour = palette(colours.index(row[colour_axis])) if colour_axis else None
            style = dashes[styles.index(row[style_axis]) % len(dashes)] if style_axis else "-"
            ax.plot(steps, values, color=colour, linestyle=style, linewidth=2.4 if starred else 0.9,
                    alpha=1.0 if starred else 0.7, marker="o" if small else None, markersize=3,
                    label=_label(row, axes) if small else None)
            if starred and steps:
                ax.plot(steps[-1], values[-1], marker="*", markersize=13, color=colour or "black",
                        markeredgecolor="black", zorder=5)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if trained:  # the untrained step 0 would squeeze the trained runs together
            low, high = min(trained), max(trained)
            ax.set_ylim(low - 0.05 * (high - low or 1), high + 0.05 * (high - low or 1))
            ax.set_xlim(left=0.8)
        ax.grid(alpha=0.3)
        if panel is not None:
            ax.set_title(f"{panel_axis} = {panel}", fontsize=9)
    grid[0][0].set_ylabel("test accuracy")
    if small:
        grid[0][0].legend(fontsize=7, loc="lower right")
    else:
        handles = [plt.Line2D([], [], color=palette(i), linewidth=2) for i in range(len(colours))]
        names = [f"{colour_axis} = {c}" for c in colours]
        handles += [plt.Line2D([], [], color="grey", linestyle=dashes[i % len(dashes)]) for i in range(len(styles))]
        names += [f"{style_axis} = {v}" for v in styles]
        fig.legend(handles, names, fontsize=8, loc="lower center", ncol=per_row, frameon=False)
    fig.suptitle(f"test accuracy per epoch; \u2605 the best {min(BEST_MARKED, len(best))} of the comparison",
                 fontsize=10)
    _margins(fig, bottom=0.6 + (0.15 + LEGEND_ROW_IN * legend_rows if legend_rows else 0), top=0.75 if panel_axis else 0.5)
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return path


def _margins(fig, left: float = 0.8, right: float = 0.15, bottom: float = 0.6, top: float = 0.75,
             gap: float = 0.12) -> None:
    """Fixed margins in inches (room for tick labels, axis labels, titles, a legend band below), where
    tight_layout would measure every text first: a third of a large sweep's curves plot."""
    width, height = fig.get_size_inches()
    panels = max(1, len(fig.axes))
    axes_width = (width - left - right - gap * (panels - 1)) / panels
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=gap / axes_width)


def plot_heatmap(table: pd.DataFrame, x: str, y: str, path: Path, facets: list[str] = (),
                 averaged: list[str] = ()) -> Path:
    """Final test accuracy over two swept axes, a panel per value of the others (`facets`); a cell
    is a mean only over `averaged` (seeds). The best cell of all is framed in red."""
    from matplotlib.patches import Rectangle

    from ..lifecycle.plots import pyplot

    plt = pyplot()
    facets = list(facets)
    groups = list(table.groupby(facets, dropna=False)) if facets else [((), table)]
    grids = [(key if isinstance(key, tuple) else (key,), part.pivot_table(index=y, columns=x, values="test_acc",
                                                                          aggfunc="mean")) for key, part in groups]
    every = pd.concat([g.stack() for _, g in grids])
    low, high = float(every.min()), float(every.max())
    fig, panels = plt.subplots(1, len(grids), figsize=(min(5.2 * len(grids), 18), 4.6), squeeze=False,
                               gridspec_kw={"wspace": 0.45})  # room for each panel's y label
    image = None
    for ax, (key, grid) in zip(panels[0], grids):
        image = ax.imshow(grid.values, cmap="viridis", vmin=low, vmax=high)
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if facets:
            ax.set_title(", ".join(f"{f} = {v}" for f, v in zip(facets, key)), fontsize=9)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                value = grid.values[i, j]
                ax.text(j, i, f"{value:.4f}", ha="center", va="center", fontsize=8,
                        color="black" if value > (low + high) / 2 else "white")
                if value == high:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    fig.colorbar(image, ax=list(panels[0]), label="final test accuracy")
    fig.suptitle("final test accuracy" + (f", mean over {', '.join(averaged)}" if averaged else "")
                 + "; the best framed in red", fontsize=10)
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return path


def log_scaled(values: pd.Series) -> bool:
    """Whether a searched axis reads best on a log scale: positive, spanning 30 times or more."""
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    return len(numbers) > 1 and numbers.min() > 0 and numbers.max() / numbers.min() >= 30


def plot_search(table: pd.DataFrame, axes: list[str], path: Path, objective: str = "test_acc",
                log_axes: set[str] | None = None) -> Path:
    """Each searched value against the objective, a panel per axis (log where the search was,
    `log_axes`, from the runs' search.log tag; without it, where the values span decades), the best
    trial starred; a pruned trial is a grey cross at the bottom, a stopped or failed one a red cross."""
    from ..lifecycle.plots import pyplot

    plt = pyplot()
    fig, panels = plt.subplots(1, len(axes), figsize=(min(4.6 * len(axes), 18), 4.2), sharey=True, squeeze=False)
    done = table[table["status"] == "FINISHED"].dropna(subset=[objective])
    others = table.drop(done.index)
    best = done.iloc[0] if not done.empty else None  # the table's first row: its tie rule
    floor = float(done[objective].min()) if not done.empty else 0.0
    for ax, axis in zip(panels[0], axes):
        ax.scatter(done[axis], done[objective], s=22, color="tab:blue", alpha=0.8, label="trials")
        for status, rows in others.groupby("status"):  # at the bottom: their value is not comparable
            ax.scatter(rows[axis], [floor] * len(rows), marker="x", color="grey" if status == "PRUNED" else "red",
                       label=f"{status.lower()} (drawn at the bottom)")
        if best is not None:
            ax.scatter([best[axis]], [best[objective]], marker="*", s=260, color="gold", edgecolor="black",
                       zorder=5, label=f"best: {best['run_id'][:8]}")
        if (axis in log_axes) if log_axes is not None else log_scaled(table[axis]):
            ax.set_xscale("log")
        ax.set_xlabel(axis)
        ax.grid(alpha=0.3)
    panels[0][0].set_ylabel(f"final {objective}")
    panels[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{len(done)} trials: each searched value against the final {objective}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})
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
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return path
