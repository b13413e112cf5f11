"""Pictures logged with a run: sample predictions and the confusion matrix.

A sweep draws the same two figures for every run, so each figure is laid out once per process
and only its data, labels and colours change from run to run: that costs a fraction of drawing
it anew (see `python -m mnist_logreg.bench`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np

# PNG compression level: 1 writes these small plots several times faster than the default 6.
_PNG = {"compress_level": 1}


def pyplot():
    """pyplot on the Agg backend (compare's one-off plots use it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(figsize: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas, outside pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[t, p]: how many examples of class t were predicted as p."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (true.astype(np.int64), pred.astype(np.int64)), 1)
    return counts


class _Predictions:
    """A row of n images titled with predicted and true labels."""

    def __init__(self, n: int) -> None:
        self.fig = _figure((1.3 * n, 1.9))
        self.images, self.titles = [], []
        for ax in np.atleast_1d(self.fig.subplots(1, n)):
            self.images.append(ax.imshow(np.zeros((28, 28)), cmap="gray_r", vmin=0.0, vmax=1.0))
            self.titles.append(ax.set_title("", fontsize=7))
            ax.axis("off")
        self.fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.78, wspace=0.15)


@functools.lru_cache(maxsize=4)
def _predictions_figure(n: int) -> _Predictions:
    return _Predictions(n)


def plot_predictions(
    images: np.ndarray, true: np.ndarray, pred: np.ndarray, path: Path, names: Sequence[str] | None = None
) -> Path:
    """A row of images (N, 784 or 28x28, values in [0, 1]) titled with predicted and true labels;
    wrong ones in red."""
    label = (lambda i: names[int(i)]) if names else (lambda i: str(int(i)))
    figure = _predictions_figure(len(images))
    for artist, title, img, t, p in zip(figure.images, figure.titles, images, true, pred):
        artist.set_data(np.asarray(img).reshape(28, 28))
        title.set_text(f"pred {label(p)}\ntrue {label(t)}")
        title.set_color("black" if t == p else "red")
    figure.fig.savefig(path, dpi=100, pil_kwargs=_PNG)
    return path


class _Confusion:
    """A k x k heatmap with a count in each cell, axes labelled with the class names."""

    def __init__(self, names: tuple[str, ...]) -> None:
        k = len(names)
        self.fig = _figure((6.5, 5.5))
        self.ax = self.fig.add_subplot()
        self.image = self.ax.imshow(np.zeros((k, k)), cmap="Blues", vmin=0, vmax=1)
        self.fig.colorbar(self.image, ax=self.ax)
        self.ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        self.ax.set_yticks(range(k), names, fontsize=8)
        self.ax.set_xlabel("predicted")
        self.ax.set_ylabel("true")
        self.cells = [[self.ax.text(p, t, "", ha="center", va="center", fontsize=6) for p in range(k)]
                      for t in range(k)]
        wide = max(len(n) for n in names) > 3
        self.fig.subplots_adjust(left=0.22 if wide else 0.1, right=0.97, bottom=0.22 if wide else 0.1, top=0.93)


@functools.lru_cache(maxsize=4)
def _confusion_figure(names: tuple[str, ...]) -> _Confusion:
    return _Confusion(names)


def plot_confusion(counts: np.ndarray, path: Path, names: Sequence[str] | None = None, title: str = "") -> Path:
    """The confusion matrix as a heatmap with counts in each cell."""
    k = counts.shape[0]
    figure = _confusion_figure(tuple(names) if names else tuple(str(i) for i in range(k)))
    top = max(int(counts.max()), 1) if counts.size else 1
    figure.image.set_data(counts)
    figure.image.set_clim(0, top)
    for t in range(k):
        for p in range(k):
            cell = figure.cells[t][p]
            cell.set_text(str(counts[t, p]))
            cell.set_color("white" if counts[t, p] > top / 2 else "black")
    figure.ax.set_title(title or "confusion matrix (test set)")
    figure.fig.savefig(path, dpi=100, pil_kwargs=_PNG)
    return path
