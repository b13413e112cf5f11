"""Pictures logged with a run: sample predictions and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[t, p]: how many examples of class t were predicted as p."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (true.astype(np.int64), pred.astype(np.int64)), 1)
    return counts


def plot_predictions(
    images: np.ndarray, true: np.ndarray, pred: np.ndarray, path: Path, names: Sequence[str] | None = None
) -> Path:
    """A row of images (N, 784 or 28x28) titled with predicted and true labels; wrong ones in red."""
    plt = _pyplot()
    label = (lambda i: names[int(i)]) if names else (lambda i: str(int(i)))
    fig, axes = plt.subplots(1, len(images), figsize=(1.3 * len(images), 1.9))
    for ax, img, t, p in zip(np.atleast_1d(axes), images, true, pred):
        ax.imshow(img.reshape(28, 28), cmap="gray_r")
        ax.set_title(f"pred {label(p)}\ntrue {label(t)}", fontsize=7, color="black" if t == p else "red")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(counts: np.ndarray, path: Path, names: Sequence[str] | None = None, title: str = "") -> Path:
    """The confusion matrix as a heatmap with counts in each cell."""
    plt = _pyplot()
    k = counts.shape[0]
    names = list(names) if names else [str(i) for i in range(k)]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(counts, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (test set)")
    threshold = counts.max() / 2 if counts.size else 0
    for t in range(k):
        for p in range(k):
            ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=6,
                    color="white" if counts[t, p] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
