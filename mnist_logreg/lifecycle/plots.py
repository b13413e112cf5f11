"""Pictures logged with a run: sample predictions and the confusion matrix.

Every run of a sweep gets both, so they are drawn straight onto a Pillow image, a few milliseconds
each: matplotlib took 70 ms a figure here and is imported only by the comparison at a sweep's end
(`pyplot`). The colours are matplotlib's: `gray_r` for the images, ColorBrewer's `Blues` (the nine
colours matplotlib interpolates) for the counts.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import numpy as np

# PNG compression level: 1 writes these small images several times faster than the default 6.
_PNG = {"compress_level": 1}
_BLUES = np.array([[0xF7, 0xFB, 0xFF], [0xDE, 0xEB, 0xF7], [0xC6, 0xDB, 0xEF], [0x9E, 0xCA, 0xE1], [0x6B, 0xAE, 0xD6],
                   [0x42, 0x92, 0xC6], [0x21, 0x71, 0xB5], [0x08, 0x51, 0x9C], [0x08, 0x30, 0x6B]], dtype=np.float64)
_BLACK, _WHITE, _RED = (0, 0, 0), (255, 255, 255), (214, 39, 40)


def pyplot():
    """pyplot on the Agg backend (the comparison's plots use it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@functools.lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def blues(fraction: np.ndarray) -> np.ndarray:
    """RGB (uint8) of values in [0, 1] on the Blues scale."""
    at = np.clip(np.asarray(fraction, dtype=np.float64), 0.0, 1.0) * (len(_BLUES) - 1)
    low = np.minimum(at.astype(np.int64), len(_BLUES) - 2)
    t = (at - low)[..., None]
    return np.rint(_BLUES[low] * (1 - t) + _BLUES[low + 1] * t).astype(np.uint8)


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[t, p]: how many examples of class t were predicted as p."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (true.astype(np.int64), pred.astype(np.int64)), 1)
    return counts


def _text(draw, xy, text: str, size: int, fill=_BLACK, anchor: str = "mm") -> None:
    """Text anchored at xy (integers), drawn from its rendered mask: a sweep's runs draw the same
    labels and counts again and again, and Pillow lays each one out anew (a confusion matrix is
    120 of them)."""
    mask, (left, top) = _text_mask(text, size, anchor)
    draw.bitmap((xy[0] + left, xy[1] + top), mask, fill=fill)


@functools.lru_cache(maxsize=4096)
def _text_mask(text: str, size: int, anchor: str):
    """The text's coverage (an "L" image) and where its top left lies from the anchor point."""
    from PIL import Image, ImageDraw

    font = _font(size)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    box = probe.multiline_textbbox((0, 0), text, font=font, anchor=anchor, align="center", spacing=2)
    left, top, right, bottom = math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).multiline_text((-left, -top), text, font=font, fill=255, anchor=anchor, align="center",
                                        spacing=2)
    return mask, (left, top)


def _rotated(image, text: str, size: int, angle: float, xy: tuple[int, int], anchor: str) -> None:
    """Paste text turned by angle degrees (counter-clockwise) so that its anchor corner lies at xy:
    "ne" puts its top right there (column labels), "c" its centre (an axis title)."""
    from PIL import Image, ImageDraw

    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    label = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(label).text((-left + 1, -top + 1), text, font=font, fill=255)
    turned = label.rotate(angle, expand=True, resample=Image.BICUBIC)
    w, h = turned.size
    x, y = (xy[0] - w, xy[1]) if anchor == "ne" else (xy[0] - w // 2, xy[1] - h // 2)
    image.paste(Image.new("RGB", turned.size, _BLACK), (x, y), turned)


def plot_predictions(
    images: np.ndarray, true: np.ndarray, pred: np.ndarray, path: Path, names: Sequence[str] | None = None
) -> Path:
    """A row of images (N, 784 or 28x28, values in [0, 1]) titled with predicted and true labels;
    wrong ones in red."""
    from PIL import Image, ImageDraw

    label = (lambda i: names[int(i)]) if names else (lambda i: str(int(i)))
    scale, pad, head = 4, 18, 44
    side = 28 * scale
    n = len(images)
    canvas = Image.new("RGB", (n * (side + pad) + pad, head + side + pad), _WHITE)
    draw = ImageDraw.Draw(canvas)
    for i, (img, t, p) in enumerate(zip(images, true, pred)):
        pixels = np.rint(255 * (1 - np.clip(np.asarray(img, dtype=np.float64).reshape(28, 28), 0, 1)))
        tile = Image.fromarray(pixels.astype(np.uint8), "L").resize((side, side), Image.NEAREST)
        x = pad + i * (side + pad)
        canvas.paste(tile, (x, head))
        _text(draw, (x + side // 2, head // 2 + 2), f"pred {label(p)}\ntrue {label(t)}", 12,
              _BLACK if t == p else _RED)
    canvas.save(path, **_PNG)
    return path


def plot_confusion(counts: np.ndarray, path: Path, names: Sequence[str] | None = None, title: str = "") -> Path:
    """The confusion matrix as a heatmap with counts in each cell, a colour bar and axis titles."""
    from PIL import Image, ImageDraw

    k = counts.shape[0]
    names = [str(n) for n in names] if names else [str(i) for i in range(k)]
    font = _font(11)
    name_w = max(font.getbbox(n)[2] for n in names)
    cell = 40
    left, top = 40 + name_w, 46
    grid = k * cell
    bottom = top + grid + int(0.75 * name_w) + 50  # room for the labels turned by 45 degrees
    bar_x = left + grid + 30
    width = bar_x + 22 + 60
    image = Image.new("RGB", (width, bottom), _WHITE)
    draw = ImageDraw.Draw(image)
    most = max(int(counts.max()), 1) if counts.size else 1
    colours = blues(counts / most)
    for t in range(k):
        for p in range(k):
            x, y = left + p * cell, top + t * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=tuple(int(c) for c in colours[t, p]))
            _text(draw, (x + cell // 2, y + cell // 2), str(counts[t, p]), 10,
                  _WHITE if counts[t, p] > most / 2 else _BLACK)
    draw.rectangle([left - 1, top - 1, left + grid, top + grid], outline=_BLACK)
    for i, n in enumerate(names):
        _text(draw, (left - 6, top + i * cell + cell // 2), n, 11, anchor="rm")
        _rotated(image, n, 11, 45, (left + i * cell + cell // 2 + 4, top + grid + 6), "ne")
    _text(draw, (left + grid // 2, bottom - 16), "predicted", 13)
    _rotated(image, "true", 13, 90, (14, top + grid // 2), "c")
    _text(draw, (left + grid // 2, top // 2), title or "confusion matrix (test set)", 15)
    # The colour bar, 0 at the bottom, with about five round ticks.
    ramp = blues(np.linspace(1, 0, grid))[:, None, :].repeat(22, axis=1)
    image.paste(Image.fromarray(ramp, "RGB"), (bar_x, top))
    draw.rectangle([bar_x - 1, top - 1, bar_x + 22, top + grid], outline=_BLACK)
    step = max(1, _round_step(most / 5))
    for value in range(0, most + 1, step):
        y = top + grid - round(grid * value / most)
        draw.line([bar_x + 22, y, bar_x + 26, y], fill=_BLACK)
        _text(draw, (bar_x + 30, y), str(value), 11, anchor="lm")
    image.save(path, **_PNG)
    return path


def _round_step(raw: float) -> int:
    """1, 2 or 5 times a power of ten, at least raw."""
    power = 10 ** int(np.floor(np.log10(max(raw, 1.0))))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
